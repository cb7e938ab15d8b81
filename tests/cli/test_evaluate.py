"""`lowvram validate | test | predict`: checkpoints of `lowvram fit` (pruned and low-bit included) load, predictions
are written where torch.load(weights_only=True) reads them, strategy=auto streams a model bigger than the card."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from lightning_lowvram.cli import ConfigError, run

GPT = ["model=tiny_gpt", "data=tiny_text", "+model.n_layer=2", "trainer.logger=false"]
# the demo GPT at 25.5M parameters (97 MiB) on a 64 MiB slice: its evaluation fits only streamed
BIG = ["model=demo_gpt", "data=demo_text", "model.d_model=512", "model.n_layer=8", "gpu=demo_slice",
       "trainer.logger=false"]  # fmt: skip
FIT = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "test_after_fit=false"]


def _cfg(*overrides):
    with initialize_config_module("lightning_lowvram.conf", version_base="1.3"):
        return compose("lowvram", overrides=["example=none", *overrides])


def _fit(tmp_path, *extra):
    summary = run(_cfg("command=fit", *GPT, *FIT, f"trainer.default_root_dir={tmp_path / 'fit'}", *extra))
    [ckpt] = summary["checkpoints"]
    return ckpt


def _eval(stage, tmp_path, *extra, model=GPT):
    limits = ["trainer.limit_val_batches=2", "trainer.limit_test_batches=2", "trainer.limit_predict_batches=2"]
    return run(_cfg(f"command={stage}", *model, *limits, f"trainer.default_root_dir={tmp_path / stage}", *extra))


def test_validate_test_predict_from_a_fit_checkpoint(tmp_path, capsys):
    ckpt = _fit(tmp_path)
    validated = _eval("validate", tmp_path, f"ckpt_path='{ckpt}'")
    assert "val/loss" in validated["metrics"] and validated["batches"] >= 1 and validated["weights"] == ckpt
    tested = _eval("test", tmp_path, f"ckpt_path='{ckpt}'")
    assert "test/loss" in tested["metrics"] and tested["memory"]["test"].total > 0
    predicted = _eval("predict", tmp_path, f"ckpt_path='{ckpt}'")
    path = Path(predicted["predictions"])
    assert path == tmp_path / "predict" / "predictions.pt"
    predictions = torch.load(path, weights_only=True)
    assert len(predictions) == predicted["batches"] >= 1
    assert predictions[0].dtype == torch.long  # the next byte at every position
    out = capsys.readouterr().out
    assert "predict on the data's test_dataloader (it has no predict_dataloader)" in out
    assert "predictions      " in out and "weights          " in out


def test_pruned_and_low_bit_checkpoints_load(tmp_path):
    pruned = _fit(tmp_path / "pruned", "strategy=prune", "strategy.pruning.amount=0.5")
    summary = _eval("validate", tmp_path / "pruned", f"ckpt_path='{pruned}'")
    assert "restored: pruned shapes from the checkpoint" in summary["strategies"]
    saved = torch.load(pruned, weights_only=False)["state_dict"]
    assert summary["parameters"] == sum(t.numel() for t in saved.values())  # the pruned model ran, not the fresh one
    low_bit = _fit(tmp_path / "lora", "strategy=lora_4bit", "+model.lora_rank=8")
    summary = _eval("predict", tmp_path / "lora", f"ckpt_path='{low_bit}'", "+model.lora_rank=8")
    assert "restored: 4-bit base from the checkpoint" in summary["strategies"]
    assert any(s.startswith("LowBitBaseCallback") for s in summary["strategies"])


def test_int8_or_nf4_weights_where_the_user_allows_changed_numerics(tmp_path):
    summary = _eval("validate", tmp_path, *BIG, "strategy=auto", "strategy.allow_low_bit_base=true", model=[])
    assert "weights" in summary["after"]["setting"]  # NF4 or int8: faster than streaming, by the time model
    assert any(s.startswith("LowBitBaseCallback") for s in summary["strategies"])
    assert summary["memory"]["validate"].total <= 64 * 2**20  # demo_slice's budget, nothing streamed


def test_strategy_auto_streams_a_model_bigger_than_the_card(tmp_path):
    summary = _eval("validate", tmp_path, *BIG, "strategy=auto", model=[])
    assert "WeightStreamingCallback" in summary["strategies"]
    assert summary["before"]["fits"] is False and "streamed" in summary["after"]["setting"]
    budget = 64 * 2**20  # demo_slice's tensor budget
    assert summary["memory"]["validate"].total <= summary["after"]["predicted_peak"] <= budget
    with pytest.raises(Exception, match="out of memory"):  # the same on the card without the plan
        _eval("validate", tmp_path / "plain", *BIG, model=[])


def test_plan_for_an_evaluation_stage(tmp_path, capsys):
    summary = run(_cfg("command=plan", "stage=predict", *BIG, f"trainer.default_root_dir={tmp_path}"))
    assert summary["plan"].chosen.resident_blocks is not None
    out = capsys.readouterr().out
    assert "predict plan for demo_slice: budget 64.00 MiB" in out and "apply it: lowvram predict strategy=auto" in out
    assert "callbacks.lowvram_weight_streaming.resident_blocks=" in out


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["command=predict"], r"ckpt_path=null: `lowvram predict` with model=lightning_lowvram.demo.TinyGPT"),
        (["command=plan", "stage=train"], r"stage=train: unknown; allowed: fit, validate, test, predict"),
        (["command=validate", "stage=predict"], r"stage=predict: is for `lowvram plan`"),
        (
            [
                "command=validate",
                "callbacks=[lowvram_weight_streaming]",
                "callbacks.lowvram_weight_streaming.resident_blocks=-1",
            ],
            r"resident_blocks=-1",
        ),
        (
            [
                "command=validate",
                "callbacks=[lowvram_weight_streaming]",
                "callbacks.lowvram_weight_streaming.resident_blocks=99",
            ],
            r"resident_blocks=99: TinyGPT has 2 blocks to stream",
        ),
        (
            ["command=validate", "model=digits_mlp", "data=digits", "callbacks=[lowvram_weight_streaming]"],
            r"DigitsMLP has no repeated blocks .* to stream one at a time; name the modules to stream with blocks=",
        ),
    ],
)
def test_bad_input_is_one_line_before_any_step(overrides, message, tmp_path):
    base = ["trainer.logger=false"] if any(o.startswith("model=") for o in overrides) else GPT
    with pytest.raises(ConfigError, match=message):
        run(_cfg(*base, f"trainer.default_root_dir={tmp_path}", *overrides))
