import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.errors import MissingConfigException

from lightning_lowvram import known_gpus
from lightning_lowvram.cli import ConfigError, NothingFits, build, run

CONF = Path(__file__).resolve().parents[1] / "conf"
FAST = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.logger=false",
    "trainer.enable_checkpointing=false",
]


def _cfg(*overrides):
    with initialize_config_module("lightning_lowvram.conf", version_base="1.3"):
        return compose("lowvram", overrides=["example=none", *FAST, *overrides])


def test_fit_on_the_default_demo_under_an_emulated_card(tmp_path, capsys):
    summary = run(_cfg("gpu=rtx3060_12gb", f"trainer.default_root_dir={tmp_path}"))
    assert summary["gpu"].startswith("rtx3060_12gb: 11.76 GiB, emulated on cpu")
    assert summary["effective_batch"] == 64
    assert summary["strategies"] == ["none"]
    assert 0 <= summary["metrics"]["test/acc"] <= 1 and "val/acc" in summary["metrics"]
    assert summary["memory"]["fit"]["parameters"] == summary["parameters"] * 4
    out = capsys.readouterr().out
    assert "lowvram summary" in out and "peak memory by stage and category" in out


def test_fit_the_tiny_gpt(tmp_path):
    summary = run(_cfg("model=tiny_gpt", "data=tiny_text", "+model.n_layer=1", f"trainer.default_root_dir={tmp_path}"))
    assert summary["model"] == "lightning_lowvram.demo.TinyGPT"
    assert summary["effective_batch"] == 16
    assert "val/loss" in summary["metrics"]


def test_a_users_own_module_and_data(tmp_path):
    summary = run(
        _cfg(
            "model._target_=tests.helpers.UserModule",
            "+model.width=8",
            "data._target_=tests.helpers.UserData",
            "+data.batch_size=4",
            "gpu=rtx3070_8gb",
            f"trainer.default_root_dir={tmp_path}",
        )
    )
    assert summary["model"] == "tests.helpers.UserModule"
    assert summary["effective_batch"] == 4 and "user/loss" in summary["metrics"]


def test_a_card_too_small_for_the_step_raises_the_real_oom(tmp_path):
    cfg = _cfg("gpu=rtx3060_12gb", "gpu.memory_gib=0.0001", "gpu.context_mib=0", f"trainer.default_root_dir={tmp_path}")
    with pytest.raises(NothingFits, match="out of memory on rtx3060_12gb") as info:
        run(cfg)
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)  # the budget's real OOM, then the advice


def test_overrides_reach_the_trainer_and_model(tmp_path):
    parts = build(
        _cfg(
            "trainer.max_epochs=2",
            "trainer.accumulate_grad_batches=2",
            "+model.hidden=16",
            f"trainer.default_root_dir={tmp_path}",
        )
    )
    assert parts["trainer"].max_epochs == 2 and parts["trainer"].accumulate_grad_batches == 2
    assert parts["model"].net[0].out_features == 16
    assert [type(c).__name__ for c in parts["callbacks"].values()] == ["MemoryReportCallback"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["gpu=rtx3060_12gb", "gpu.memory_gib=-1"], r"gpu.memory_gib=-1: must be > 0"),
        (["model._target_=no_such_pkg.Model"], "model._target_=no_such_pkg.Model: ImportError"),
        (["data._target_=no_such_pkg.Data"], "data._target_=no_such_pkg.Data: ImportError"),
        (
            ["model._target_=tests.helpers.NoTrainingStep"],
            "model._target_=tests.helpers.NoTrainingStep: has no training",
        ),
        (["model._target_=tests.helpers.NotAModule"], "not a LightningModule"),
        (["command=train"], "command=train: unknown; allowed: fit"),
        # a constructor's reason is in the line, not only Hydra's "Error in call to target"
        (["strategy=prune", "strategy.pruning.amount=2"], r"strategy.pruning.amount=2: must be a number in \[0, 1\)"),
        (["strategy=micro_batch", "strategy.micro_batch.count_fn=tokens"], "count_fn=tokens: must be one of .causal"),
        (["strategy=chunked_ce"], r"strategy=.*DigitsMLP holds no Hugging Face \*ForCausal"),
        (["strategy=chunked_ce", "strategy.chunked_ce.chunk_size=0"], r"chunk_size=0: .*must be an integer >= 1"),
        (["strategy=chunked_ce", "strategy.chunked_ce.backend=fast"], r"backend=fast: must be one of .auto.,"),
    ],
)
def test_bad_input_is_one_line_naming_the_key_before_training(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        build(_cfg(*overrides))
    assert "\n" not in str(info.value)


def test_unknown_gpu_lists_the_known_cards():
    with pytest.raises(MissingConfigException, match="Could not find 'gpu/rtx9999'") as info:
        _cfg("gpu=rtx9999")
    assert "rtx3060_12gb" in str(info.value.options)


def _options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


# a strategy that needs a model of a kind: the demo GPT with LoRA adapters for the low-bit base, a HF causal LM for
# the chunked cross-entropy
NEEDS = {
    "lora_4bit": ["model=tiny_gpt", "data=tiny_text", "+model.lora_rank=8", "+model.n_layer=1"],
    "chunked_ce": ["model._target_=tests.helpers.TinyCausalLM", "data._target_=tests.helpers.TokenData"],  # HF LM
}


# every card with no strategy, every strategy on one card and on the machine's own (gpu and strategy are independent
# groups: all 150 pairs took a minute of CI for nothing more)
PAIRS = [(g, "none") for g in _options("gpu")] + [
    (g, s) for s in _options("strategy") if s != "none" for g in ("rtx3060_12gb", "auto")
]


@pytest.mark.parametrize(("gpu", "strategy"), PAIRS)
def test_every_gpu_and_strategy_composes_and_builds(gpu, strategy, tmp_path):
    cfg = _cfg(f"gpu={gpu}", f"strategy={strategy}", f"trainer.default_root_dir={tmp_path}", *NEEDS.get(strategy, []))
    assert cfg.gpu.name == gpu and cfg.strategy.name == strategy
    assert gpu in known_gpus()
    parts = build(cfg)
    assert parts["profile"].name == (
        "cpu" if gpu == "auto" and not torch.cuda.is_available() else parts["profile"].name
    )


def test_lora_on_a_4_bit_base_composes_with_micro_batching_and_checkpointing(tmp_path):
    lora = ["model=tiny_gpt", "data=tiny_text", "+model.lora_rank=8", "data.batch_size=32"]
    plain = run(_cfg(*lora, "strategy=none", f"trainer.default_root_dir={tmp_path / 'plain'}"))
    budget = plain["memory"]["fit"].total // 2  # LoRA on the float base needs twice this card
    card = ["gpu=rtx3060_12gb", f"gpu.memory_gib={budget / 2**30}", "gpu.context_mib=0"]
    with pytest.raises(NothingFits):
        run(_cfg(*lora, *card, "strategy=none", f"trainer.default_root_dir={tmp_path / 'oom'}"))
    summary = run(
        _cfg(*lora, *card, "strategy=[lora_4bit,micro_batch,checkpointing]", f"trainer.default_root_dir={tmp_path}")
    )
    low_bit, micro, ckpt = summary["strategies"]
    assert low_bit.startswith("LowBitBaseCallback (9 frozen layer(s) in 4 bits") and "(0.13x)" in low_bit
    assert micro.startswith("AutoMicroBatchCallback (micro-batch train ") and "2 blocks checkpointed" in ckpt
    assert summary["memory"]["fit"].total <= budget


def _lowvram(*args, cwd):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([*args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("entry", [["lowvram"], [sys.executable, "-m", "lightning_lowvram"]], ids=["script", "module"])
def test_console_script_and_module(entry, tmp_path):
    exe = Path(sys.executable).parent / "lowvram"
    cmd = [str(exe)] if entry == ["lowvram"] else entry
    proc = _lowvram(*cmd, "fit", "example=mlp", "gpu=t4_16gb", *FAST, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lowvram summary" in proc.stdout
    assert "t4_16gb: 14.75 GiB, emulated on cpu" in proc.stdout
    assert "effective batch  64 = 64 per batch x 1 accumulation x 1 device(s)" in proc.stdout


@pytest.mark.slow
def test_cli_errors_exit_2_with_one_line(tmp_path):
    proc = _lowvram(sys.executable, "-m", "lightning_lowvram", "train", cwd=tmp_path)
    assert proc.returncode == 2 and "unknown command 'train'; allowed: fit" in proc.stderr
    proc = _lowvram(sys.executable, "-m", "lightning_lowvram", "fit", "gpu=rtx9999", cwd=tmp_path)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip() == f"lowvram: error: gpu=rtx9999: not a known GPU profile; known: {', '.join(known_gpus())}"
    )
    proc = _lowvram(sys.executable, "-m", "lightning_lowvram", "fit", "model._target_=nope.Nope", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("lowvram: error: model._target_=nope.Nope: ")


def test_micro_batching_settles_on_a_smaller_size_on_a_shared_small_card(tmp_path, capsys):
    """A 6 GB card with 3 MB free (shared): batch 1024 does not fit, the callback splits it; the batch stays 1024."""
    summary = run(
        _cfg(
            "gpu=gtx1660_6gb",
            "gpu.free_gib=0.003",
            "strategy=micro_batch",
            "+data.batch_size=1024",
            "+model.hidden=512",
            "+model.depth=1",
            "trainer.limit_train_batches=1",
            f"trainer.default_root_dir={tmp_path}",
        )
    )
    assert summary["gpu"].startswith("gtx1660_6gb: 5.8 GiB, emulated on cpu (budget 3.07 MiB)")
    assert summary["effective_batch"] == 1024
    [line] = summary["strategies"]
    assert line.startswith("AutoMicroBatchCallback (micro-batch train 256, validate ")
    assert "failed: train 512" in line
    assert "micro-batch train 256" in capsys.readouterr().out


def test_prune_strategy_from_the_command_line_lowers_the_fit_peak(tmp_path):
    pruned = run(_cfg("strategy=prune", "strategy.pruning.amount=0.3", f"trainer.default_root_dir={tmp_path / 'a'}"))
    plain = run(_cfg("strategy=none", f"trainer.default_root_dir={tmp_path / 'b'}"))
    [line] = pruned["strategies"]
    assert line.startswith("PruningCallback (structured magnitude, target 0.30, sparsity 0.428")
    assert pruned["metrics"]["lowvram/pruning/sparsity"] > 0.3
    # pruned before the optimizer exists: every step runs the smaller model (README: 318 KiB, not 553 KiB)
    assert pruned["memory"]["fit"].total < 0.6 * plain["memory"]["fit"].total


def test_quant_strategy_prints_the_float_vs_int8_table(tmp_path, capsys):
    summary = run(_cfg("strategy=quant", f"trainer.default_root_dir={tmp_path}"))
    assert summary["strategies"] == ["DynamicQuantCallback"]
    out = capsys.readouterr().out
    summary_text = out[out.index("lowvram summary") :]
    assert "float vs int8 (test)" in summary_text and "test/acc" in summary_text and "linear_bytes" in summary_text


SHARED_CARD = ["gpu=gtx1660_6gb", "gpu.free_gib=0.003", "+data.batch_size=1024", "+model.hidden=512", "+model.depth=1"]


@pytest.mark.usefixtures("no_cublas_workspace")  # a 3 MB card: the CPU-emulated run has none
def test_plan_prints_the_plan_and_writes_a_chart(tmp_path, capsys):
    result = run(_cfg("command=plan", *SHARED_CARD, f"trainer.default_root_dir={tmp_path}"))
    out = capsys.readouterr().out
    assert "plan for gtx1660_6gb" in out and "->" in out and "apply it: lowvram fit strategy=auto" in out
    assert result["plan"].chosen.micro_batch_size < 1024
    assert open(result["chart"], "rb").read(4) == b"\x89PNG"


@pytest.mark.usefixtures("no_cublas_workspace")  # a 3 MB card: the CPU-emulated run has none
def test_strategy_auto_applies_the_plan_and_trains_under_the_emulated_card(tmp_path):
    summary = run(
        _cfg("strategy=auto", *SHARED_CARD, "trainer.limit_train_batches=1", f"trainer.default_root_dir={tmp_path}")
    )
    assert summary["effective_batch"] == 1024
    assert any(line.startswith("AutoMicroBatchCallback (micro-batch train ") for line in summary["strategies"])
    assert all("0 OOM retries" in line for line in summary["strategies"] if line.startswith("AutoMicroBatch"))


def test_plan_needs_a_card():
    with pytest.raises(ConfigError, match="gpu=cpu: has no memory size to plan for"):
        build(_cfg("command=plan", "gpu=cpu"))


@pytest.mark.usefixtures("no_cublas_workspace")  # a 3 MB card: the CPU-emulated run has none
def test_the_plans_hydra_overrides_compose_into_the_same_callbacks(tmp_path):
    result = run(_cfg("command=plan", *SHARED_CARD, f"trainer.default_root_dir={tmp_path}"))
    chosen = result["plan"].chosen
    parts = build(_cfg(*SHARED_CARD, *result["plan"].overrides(), f"trainer.default_root_dir={tmp_path}"))
    [micro] = [c for c in parts["callbacks"].values() if type(c).__name__ == "AutoMicroBatchCallback"]
    assert micro.sizes["train"] == chosen.micro_batch_size
    # (a plan for a GTX 1660 picks fp16; on a machine without CUDA, Lightning runs 16-mixed as bf16-mixed)
    on_cpu = {"16-mixed": "bf16-mixed"} if not torch.cuda.is_available() else {}
    assert parts["trainer"].precision == on_cpu.get(chosen.precision, chosen.precision)


def test_plan_across_cards_prints_per_rank_memory_and_the_overrides_that_run_it(tmp_path, capsys):
    result = run(_cfg("command=plan", "gpu=rtx3090_24gb", "trainer.devices=4", "model=tiny_gpt", "data=tiny_text",
                      "+model.n_layer=1", f"trainer.default_root_dir={tmp_path}"))  # fmt: skip
    out = capsys.readouterr().out
    assert "plan for 4 x rtx3090_24gb, per rank" in out and "batch 16 a rank kept" in out
    chosen = result["plan"].chosen
    assert chosen.devices == 4 and "lowvram fit strategy=auto gpu=... trainer.devices=4" in out
    parts = build(_cfg(*result["plan"].overrides(), "model=tiny_gpt", "data=tiny_text", "+model.n_layer=1",
                       f"trainer.default_root_dir={tmp_path}"))  # fmt: skip
    assert parts["trainer"].num_devices == 4


def test_the_fsdp2_node_gives_the_trainer_fsdp2strategy(tmp_path):
    from lightning_lowvram import FSDP2Strategy

    parts = build(_cfg("strategy=fsdp2", "strategy.trainer_strategy.reshard_after_forward=false", "trainer.devices=4",
                       "trainer.accelerator=cpu", f"trainer.default_root_dir={tmp_path}"))  # fmt: skip
    strategy = parts["trainer"].strategy
    assert isinstance(strategy, FSDP2Strategy) and not strategy.reshard_after_forward and not strategy.cpu_offload
    assert parts["trainer"].num_devices == 4 and not any("strategy" in name for name in parts["callbacks"])
    offload = build(_cfg("strategy=fsdp2_offload", f"trainer.default_root_dir={tmp_path}"))["trainer"].strategy
    assert isinstance(offload, FSDP2Strategy) and offload.cpu_offload


@pytest.mark.usefixtures("one_process_group")
def test_fit_with_the_fsdp2_node_on_one_cpu_process(tmp_path):
    summary = run(_cfg("strategy=fsdp2", "trainer.accelerator=cpu", f"trainer.default_root_dir={tmp_path}"))
    assert "val/acc" in summary["metrics"] and "test/acc" in summary["metrics"]  # fit, then test: sharded once
    assert summary["strategies"] == ["FSDP2Strategy (1 rank(s))"]


# Every rejected value: (overrides, the key=value the error line must start with). Exit 2, one line, no traceback.
BAD_OVERRIDES = [
    ("strategy=prune strategy.pruning.amount=2", "strategy.pruning.amount=2"),
    ("strategy=prune strategy.pruning.method=sideways", "strategy.pruning.method=sideways"),
    ("strategy=prune strategy.pruning.criterion=loud", "strategy.pruning.criterion=loud"),
    ("strategy=prune strategy.pruning.schedule=sometimes", "strategy.pruning.schedule=sometimes"),
    ("strategy=prune strategy.pruning.scope=planet", "strategy.pruning.scope=planet"),
    ("strategy=prune strategy.pruning.start_step=-1", "strategy.pruning.start_step=-1"),
    ("strategy=prune strategy.pruning.frequency=0", "strategy.pruning.frequency=0"),
    ("strategy=micro_batch strategy.micro_batch.min_micro_batch_size=0", "strategy.micro_batch.min_micro_batch_size=0"),
    ("strategy=micro_batch strategy.micro_batch.micro_batch_size=big", "strategy.micro_batch.micro_batch_size=big"),
    ("strategy=micro_batch strategy.micro_batch.count_fn=tokens", "strategy.micro_batch.count_fn=tokens"),
    ("strategy=quant strategy.quant.backend=nope", "strategy.quant.backend=nope"),
    ("strategy=quant strategy.quant.stages=[train]", "strategy.quant.stages=[train]"),
    ("strategy=quant strategy.quant.save_path=/dev/null/x.pt", "strategy.quant.save_path=/dev/null/x.pt"),
    ("strategy=quant strategy.quant.freeze_base=yes", "strategy.quant.freeze_base=yes"),
    ("strategy=auto strategy.margin=2", "strategy.margin=2"),
    ("strategy=auto strategy.allow_int8_base=sure", "strategy.allow_int8_base=sure"),
    ("strategy=auto strategy.allow_low_bit_base=1", "strategy.allow_low_bit_base=1"),
    ("strategy=none +strategy.foo=1", "strategy.foo=1"),
    ("strategy=fsdp2 strategy.trainer_strategy.cpu_offload=yes", "strategy.trainer_strategy.cpu_offload=yes"),
    ("strategy=fsdp2 +trainer.strategy=ddp", "trainer.strategy=ddp"),
    ("strategy=auto gpu=rtx3060_12gb trainer.devices=auto", "trainer.devices=auto"),
    ("+data.batch_size=0", "data.batch_size=0"),
    ("+data.num_workers=2", "data.num_workers=2"),
    ("+data.val_fraction=1.5", "data.val_fraction=1.5"),
    ("+model.hidden=0", "model.hidden=0"),
    ("+model.depth=0", "model.depth=0"),
    ("+model.lr=abc", "model.lr=abc"),
    ("model=tiny_gpt", "model=tiny_gpt"),
    ("data=tiny_text", "model=digits_mlp"),
    ("model._target_=nope.Nope", "model._target_=nope.Nope"),
    ("trainer.max_epochs=-5", "trainer.max_epochs=-5"),
    ("trainer.precision=17-mixed", "trainer.precision=17-mixed"),
    ("trainer.limit_train_batches=-1", "trainer.limit_train_batches=-1"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0"),
    ("+trainer.nonsense=1", "trainer.nonsense=1"),
    ("gpu.memory_gib=abc", "gpu.memory_gib=abc"),
    ("gpu=rtx3060_12gb gpu.memory_gib=abc", "gpu.memory_gib=abc"),
    ("gpu=rtx3060_12gb gpu.memory_gib=-1", "gpu.memory_gib=-1"),
    ("gpu=rtx3060_12gb gpu.context_mib=-5", "gpu.context_mib=-5"),
    ("gpu=rtx3060_12gb gpu.free_gib=-1", "gpu.free_gib=-1"),
    ("gpu.free_gib=0.5", "gpu.free_gib=0.5"),  # gpu=auto on a machine without CUDA: the budget would be ignored
    ("emulate_gpu=maybe", "emulate_gpu=maybe"),
    ("test_after_fit=perhaps", "test_after_fit=perhaps"),
    ("seed=abc", "seed=abc"),
    ("ckpt_path=/no/such.ckpt", "ckpt_path=/no/such.ckpt"),
    ("ckpt_path=last", "ckpt_path=last"),
    ("gpu=rtx9999", "gpu=rtx9999: not a known GPU profile"),
    ("trainer.default_root_dir=/dev/null/run", "trainer.default_root_dir=/dev/null/run"),
    ("strategy=prune strategy.pruning.ignore=3", "strategy.pruning.ignore=3"),
    ("strategy=lora_4bit", "strategy=lora_4bit: model=digits_mlp: DigitsMLP has no frozen Linear"),
    ("strategy=lora_4bit strategy.low_bit_base.bits=3", "strategy.low_bit_base.bits=3"),
    ("strategy=[auto,lora_4bit]", "strategy=[auto,lora_4bit]: auto stands alone"),
    ("model=tiny_gpt data=tiny_text +model.lora_rank=-1", "model.lora_rank=-1"),
]


def _main(args, cwd, monkeypatch, capsys):
    """``lowvram <args>`` in this process: (exit status, stdout, stderr)."""
    from lightning_lowvram.cli import main

    Path(cwd).mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    if not any(a.startswith("example=") for a in args):  # these tests run the digits MLP unless they say otherwise
        args = [args[0], "example=none", *args[1:]]
    try:
        main(args)
        code = 0
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="gpu.free_gib with gpu=auto is honoured where CUDA exists")
@pytest.mark.parametrize(("overrides", "culprit"), BAD_OVERRIDES, ids=[o for o, _ in BAD_OVERRIDES])
def test_every_rejected_value_is_one_line_naming_key_and_value(overrides, culprit, tmp_path, monkeypatch, capsys):
    code, out, err = _main(["fit", *FAST, *overrides.split()], tmp_path, monkeypatch, capsys)
    assert code == 2, (out[-2000:], err[-2000:])
    assert "Traceback" not in err and "Traceback" not in out
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"lowvram: error: {culprit}"), line
    assert not list(tmp_path.glob("**/*.ckpt"))  # before any training step


def test_nothing_fits_is_one_paragraph_of_advice(tmp_path, monkeypatch, capsys):
    code, out, err = _main(["fit", *FAST, "gpu=rtx3060_12gb", "gpu.free_gib=0.00001"], tmp_path, monkeypatch, capsys)
    assert code == 1 and "Traceback" not in err + out
    (paragraph,) = [line for line in err.splitlines() if line.startswith("lowvram:")]
    assert "out of memory on rtx3060_12gb (budget 10.49 KiB for tensors)" in paragraph
    assert "The planner agrees: nothing fits: the smallest predicted tensor peak is" in paragraph
    assert "Try next:" in paragraph


def _checkpoint(root, pattern):
    (path,) = Path(root).glob(f"**/{pattern}")
    return path


@pytest.mark.parametrize(
    "strategy",
    [
        ["strategy=micro_batch", "strategy.micro_batch.micro_batch_size=16"],
        ["strategy=prune"],
        ["strategy=prune", "strategy.pruning.schedule=gradual"],
        ["strategy=quant"],
    ],
    ids=["micro_batch", "prune", "prune_gradual", "quant"],
)
def test_resuming_from_an_epoch_checkpoint_gives_the_uninterrupted_weights_and_ctrl_c_says_how_to_resume(
    strategy, tmp_path, monkeypatch, capsys
):
    run = ["fit", "trainer.max_epochs=2", "trainer.limit_train_batches=4", "trainer.limit_val_batches=1",
           "trainer.logger=false", "test_after_fit=false", *strategy]  # fmt: skip
    every_epoch = [
        "+callbacks.ckpt._target_=lightning.pytorch.callbacks.ModelCheckpoint",
        "+callbacks.ckpt.save_top_k=-1",
    ]
    code, out, err = _main([*run, *every_epoch], tmp_path / "whole", monkeypatch, capsys)
    assert code == 0, err[-2000:]
    first_epoch = _checkpoint(tmp_path / "whole", "epoch=0-*.ckpt")
    code, out, err = _main([*run, f"ckpt_path='{first_epoch}'"], tmp_path / "resumed", monkeypatch, capsys)
    assert code == 0, err[-2000:]
    whole = torch.load(_checkpoint(tmp_path / "whole", "epoch=1-*.ckpt"), weights_only=False)["state_dict"]
    resumed = torch.load(_checkpoint(tmp_path / "resumed", "epoch=1-*.ckpt"), weights_only=False)["state_dict"]
    assert {k: v.shape for k, v in resumed.items()} == {k: v.shape for k, v in whole.items()}
    for name, value in whole.items():
        assert torch.allclose(resumed[name].float(), value.float(), atol=1e-6), name

    stop = ["+callbacks.stop._target_=tests.helpers.InterruptAfter", "+callbacks.stop.steps=5"]  # mid-epoch 2
    code, out, err = _main([*run, *stop], tmp_path / "cut", monkeypatch, capsys)
    assert code == 1 and "Traceback" not in err
    assert "lowvram summary" in out
    where, command = out.strip().splitlines()[-2:]
    checkpoint = where.removeprefix("interrupted: last checkpoint ")
    assert checkpoint.endswith("interrupted.ckpt") and Path(checkpoint).is_file()
    assert command.strip().startswith("resume: lowvram fit ") and command.endswith(f"ckpt_path={checkpoint}")
    code, out, err = _main(shlex.split(command)[3:], tmp_path / "again", monkeypatch, capsys)  # the printed command
    assert code == 0, err[-2000:]
    assert torch.load(_checkpoint(tmp_path / "again", "epoch=1-*.ckpt"), weights_only=False)["global_step"] == 8


def test_the_summary_is_printed_once_with_the_run_directory_and_checkpoints_and_no_tips(tmp_path, monkeypatch, capsys):
    args = ["fit", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1", "strategy=quant", "strategy.quant.compare=true"]  # fmt: skip
    code, out, err = _main(args, tmp_path, monkeypatch, capsys)
    assert code == 0, err[-2000:]
    assert out.count("lowvram summary") == 1 and out.count("peak total") == 1  # the memory table once
    assert out.count("float vs int8 (test)") == 1  # the callback's table once, in the summary
    (run_dir,) = [line.split(maxsplit=2)[2] for line in out.splitlines() if line.startswith("  run directory")]
    (ckpt,) = [line.split(maxsplit=1)[1] for line in out.splitlines() if line.startswith("  checkpoint ")]
    assert ckpt.startswith(run_dir) and Path(ckpt).is_file()
    for noise in ("GPU available", "Tip:", "Seed set", "tensorboardX", "Test metric"):
        assert noise not in out + err


@pytest.mark.slow  # a plan and two searches of a few traces each
def test_plan_with_max_context_reports_the_longest_sequence_and_largest_batch(tmp_path, capsys):
    """`lowvram plan max_context=true` on a user's HF causal LM: the lines name the card, the settings, the answer."""
    summary = run(
        _cfg(
            "command=plan",
            "max_context=true",
            "model._target_=tests.helpers.TinyCausalLM",
            "data._target_=tests.helpers.TokenData",
            "gpu=rtx3060_12gb",
            "gpu.memory_gib=0.18",  # ~10k tokens: a tiny model with every lever needs ~1.2 KiB a token
            "gpu.context_mib=0",
            f"trainer.default_root_dir={tmp_path}",
        )  # fmt: skip
    )
    sequence, batch = summary["max_context"]
    settings = "bf16-mixed, activation checkpointing, offload activations, tiled mlp, chunked cross entropy"
    assert sequence.startswith(f"longest sequence that fits rtx3060_12gb ({settings}, batch as given): ")
    tokens = int(sequence.rsplit(": ", 1)[1].split()[0])
    assert tokens >= 2048 and tokens % 256 == 0
    assert int(batch.rsplit(": ", 1)[1].split()[0]) >= 2
    assert sequence in capsys.readouterr().out


def test_max_context_must_be_true_or_false():
    with pytest.raises(ConfigError, match="max_context=maybe: must be true or false"):
        build(_cfg("command=plan", "max_context=maybe"))


TINY_LLAMA = ("model.config={model_type:llama,hidden_size:64,intermediate_size:128,num_hidden_layers:2,"
              "num_attention_heads:4,num_key_value_heads:2,vocab_size:320}")  # fmt: skip


def _text(tmp_path):
    path = tmp_path / "my.txt"
    path.write_text("\n\n".join(f"Sample {i}: the quick brown fox jumps over the lazy dog, again." for i in range(40)))
    return path


def test_a_hugging_face_fine_tune_on_a_text_file_from_the_command_line(tmp_path):
    data = ["data=text_file", f"data.path={_text(tmp_path)}", "data.max_length=256"]
    card = ["gpu=rtx3060_12gb", "gpu.memory_gib=0.02", "gpu.context_mib=0"]  # the plain step does not fit
    hf = ["model=hf_causal_lm", TINY_LLAMA, "model.lora.r=4", *data, *card]
    planned = run(_cfg(*hf, "command=plan", f"trainer.default_root_dir={tmp_path / 'plan'}"))["plan"]
    assert not planned.candidates[0].fits and planned.chosen is not None
    summary = run(_cfg(*hf, "strategy=auto", f"trainer.default_root_dir={tmp_path / 'fit'}"))
    assert "ChunkedCrossEntropyCallback" in " ".join(summary["strategies"]) and summary["metrics"]["train_loss"] > 0
    assert summary["model"] == "lightning_lowvram.models.HFCausalLM"


def test_a_local_model_directory_brings_its_own_tokenizer(tmp_path):
    from transformers import ByT5Tokenizer

    from lightning_lowvram.models import HFCausalLM

    local = tmp_path / "my-model"
    HFCausalLM(
        config={"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 4, "vocab_size": 300}
    ).model.save_pretrained(local)
    ByT5Tokenizer(extra_ids=0).save_pretrained(local)
    parts = build(_cfg("model=hf_causal_lm", f"model.name={local}", "data=text_file", f"data.path={_text(tmp_path)}",
                       f"trainer.default_root_dir={tmp_path / 'run'}"))  # fmt: skip
    assert parts["data"].tokenizer.name_or_path == str(local) and parts["model"].vocab_size() == 300


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.name=./missing-model"], r"^model.name=./missing-model: neither a local directory nor a model"),
        (["model.name=null"], r"^model.name=null: give a model name"),
        (["data.path=/no/such.txt"], r"^data.path=/no/such.txt: no such file"),
        (
            ["model.lora.r=4", "model.lora.target_modules=[nope]"],
            r"^model.lora=.*: lora.target_modules=\['nope'\]: "
            r"matches no module of LlamaForCausalLM",
        ),  # fmt: skip
        (
            ["model.config.vocab_size=96"],
            r"^data.tokenizer=null: its tokenizer gives token ids up to \d+, but the "
            r"model's vocabulary has 96",
        ),  # fmt: skip
    ],
)
def test_bad_hugging_face_input_is_one_line_naming_the_key(overrides, message, tmp_path):
    base = ["model=hf_causal_lm", TINY_LLAMA, "data=text_file", f"data.path={_text(tmp_path)}"]
    if any(o.startswith("model.name=") for o in overrides):
        base.append("model.config=null")
    with pytest.raises(ConfigError, match=message) as info:
        build(_cfg(*base, *overrides, f"trainer.default_root_dir={tmp_path / 'run'}"))
    assert "\n" not in str(info.value)


def test_a_sequence_classifier_on_labelled_jsonl_from_the_command_line(tmp_path):
    import json

    path = tmp_path / "reviews.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"review {i}", "label": i % 3}) for i in range(24)))
    bert = ("model.config={model_type:bert,hidden_size:32,num_hidden_layers:1,num_attention_heads:4,"
            "intermediate_size:64,vocab_size:300}")  # fmt: skip
    data = ["data=text_file", f"data.path={path}", "data.label_field=label"]
    model = ["model=hf_sequence_classifier", bert, "model.num_labels=3", "model.lora.r=2"]
    summary = run(_cfg(*model, *data, f"trainer.default_root_dir={tmp_path}"))
    assert summary["model"] == "lightning_lowvram.models.HFSequenceClassifier" and summary["metrics"]["train_loss"] > 0


def test_the_default_example_does_not_fit_plain_and_the_plan_makes_it_fit(tmp_path, capsys):
    import json

    with initialize_config_module("lightning_lowvram.conf", version_base="1.3"):
        cfg = compose("lowvram", overrides=[f"trainer.default_root_dir={tmp_path}", "trainer.logger=false"])
    assert (cfg.gpu.name, cfg.model._target_, cfg.strategy.name) == (
        "demo_slice",
        "lightning_lowvram.demo.TinyGPT",
        "auto",
    )
    summary = run(cfg)
    out = capsys.readouterr().out
    assert not summary["before"]["fits"] and summary["before"]["predicted_peak"] > summary["budget"]
    after = summary["after"]
    assert after["predicted_peak"] <= summary["budget"] and after["measured_peak"] <= summary["budget"]
    assert after["measured_step_s"] > 0 and summary["strategies"] != ["none"]
    assert "does not fit" in out.split("  before")[1].splitlines()[0] and "measured" in out.split("  after")[1]
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["after"]["setting"] == after["setting"] and saved["memory"]["fit"]["total"] == after["measured_peak"]
    quick = run(_cfg("example=mlp", f"trainer.default_root_dir={tmp_path / 'mlp'}", "summary_json=false"))
    assert (
        "before" not in quick and quick["strategies"] == ["none"] and not (tmp_path / "mlp" / "summary.json").exists()
    )
