"""The wheel ships the Hydra tree: another Hydra app composes it through `pkg://lightning_lowvram.conf`."""

import json
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

APP_CONFIG = """
defaults:
  - gpu: rtx3060_12gb
  - callbacks: [{callbacks}]
  - _self_
hydra:
  searchpath:
    - pkg://lightning_lowvram.conf
"""

APP = """
import json
import hydra
from hydra.utils import instantiate
import lightning_lowvram
from lightning_lowvram import GPUProfile


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg):
    profile = GPUProfile.from_config(cfg.gpu)
    callbacks = {name: type(instantiate(node)).__name__ for name, node in cfg.callbacks.items()}
    print(json.dumps({"file": lightning_lowvram.__file__, "gpu": profile.name, "gib": profile.memory_gib,
                      "callbacks": callbacks}))


main()
"""


def _run(*cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.slow
def test_wheel_installs_and_another_hydra_app_composes_the_shipped_tree(tmp_path):
    dist = tmp_path / "dist"
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(ROOT))
    wheel = next(dist.glob("lightning_lowvram-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "lightning_lowvram/conf/lowvram.yaml" in names
    assert "lightning_lowvram/conf/gpu/rtx3060_12gb.yaml" in names
    assert "lightning_lowvram/demo/tiny_text.txt" in names
    shipped = sorted(Path(n).stem for n in names if n.startswith("lightning_lowvram/conf/callbacks/lowvram_"))
    assert shipped, "no callback nodes in the wheel"

    # a fresh environment: the wheel installed for real; the heavy dependencies come from this one's site-packages
    env = tmp_path / "env"
    _run(sys.executable, "-m", "venv", str(env))
    py = env / "bin" / "python"
    _run(str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel))
    site = Path(_run(str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    (site / "zz_parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    app = tmp_path / "app"
    (app / "conf").mkdir(parents=True)
    (app / "conf" / "config.yaml").write_text(APP_CONFIG.format(callbacks=", ".join(shipped)))
    (app / "app.py").write_text(textwrap.dedent(APP))
    out = _run(str(py), "app.py", "hydra.run.dir=.", cwd=app).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert Path(result["file"]).is_relative_to(site), "the app imported the source tree, not the installed wheel"
    assert result["gpu"] == "rtx3060_12gb" and result["gib"] == 11.76
    assert set(result["callbacks"]) == set(shipped)
    assert result["callbacks"]["lowvram_memory_report"] == "MemoryReportCallback"

    # the installed console script composes the shipped tree too
    out = _run(str(env / "bin" / "lowvram"), "fit", "--cfg", "job", "gpu=t4_16gb", cwd=app).stdout
    assert "name: t4_16gb" in out
