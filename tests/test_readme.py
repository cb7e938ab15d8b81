"""Every command of the README and of docs/ runs as written (in this process, with a timeout) and says what they say."""

import re
import shlex
import signal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SKIP = ("pip ", "python -m pytest")  # the install and the test command itself (CI runs both)


def _commands() -> list[str]:
    blocks = [b for page in PAGES for b in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S)]
    lines = [line.split("  #", 1)[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#") and not line.startswith(SKIP)]


COMMANDS = _commands()


def test_the_readme_and_docs_have_the_commands_this_file_checks():
    assert "lowvram fit" in COMMANDS and "lowvram fit example=mlp gpu=rtx3060_12gb" in COMMANDS and len(COMMANDS) >= 12


@pytest.mark.slow
@pytest.mark.usefixtures("one_process_group")  # strategy=fsdp2 starts a process group of one
@pytest.mark.parametrize("command", COMMANDS, ids=[f"{i:02d}" for i in range(len(COMMANDS))])
def test_readme_command_runs_as_written(command, tmp_path, monkeypatch, capsys):
    from lightning_lowvram.cli import main

    argv = shlex.split(command)
    assert argv[0] == "lowvram" or argv[:3] == ["python", "-m", "lightning_lowvram"], command
    args = argv[1:] if argv[0] == "lowvram" else argv[3:]
    monkeypatch.chdir(tmp_path)

    def too_long(*_):
        raise TimeoutError(f"{command}: still running after 240 s")

    previous = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(240)
    try:
        main(args)
    except SystemExit as exit:
        assert exit.code in (0, None), capsys.readouterr().err[-2000:]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    out = capsys.readouterr().out
    if "--cfg" in args:
        assert "strategy:" in out
    elif args[0] == "plan":
        gpu = next(a.split("=", 1)[1] for a in args if a.startswith("gpu="))
        devices = next((int(a.split("=", 1)[1]) for a in args if a.startswith("trainer.devices=")), 1)
        cards = f"{devices} x {gpu}, per rank" if devices > 1 else gpu
        assert f"plan for {cards}:" in out, out[-3000:]
        assert "chart:" in out or any(a.startswith("stage=") for a in args), out[-3000:]  # an eval plan: no chart
    else:
        assert "lowvram summary" in out
    if "gpu.free_gib=0.003" in args:  # "a shared card with 3 MB free: settles on micro-batch 256"
        assert "micro-batch train 256" in out, out[-3000:]
