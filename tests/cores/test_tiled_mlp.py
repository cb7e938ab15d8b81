"""Tiled MLPs (lightning_lowvram.cores.tiled_mlp): exact on the HF families users bring, a fraction of the MLP's
bytes."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.data import DataLoader

from lightning_lowvram import ActivationCheckpointingCallback, ChunkedCrossEntropyCallback, MemoryReportCallback
from lightning_lowvram.cores.activation_checkpointing import checkpoint_blocks
from lightning_lowvram.cores.tiled_mlp import default_tiles, mlp_modules, tile_mlps, tiled_mlp, untile_mlps
from lightning_lowvram.planner import estimate_step_memory
from tests.helpers import quiet_trainer
from tests.real_models.models import HFModule, causal_lm, hf_batches


def _grads(model, batch, seed=1):
    torch.manual_seed(seed)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointed", [False, True])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma2", "gpt2"])
def test_loss_and_every_gradient_equal_the_plain_models(family, checkpointed):
    """Three tiles of 16 tokens (uneven), alone and inside checkpointed blocks whose inputs are offloaded."""
    model = causal_lm(family)
    model.train()
    tiled = copy.deepcopy(model)
    names = tile_mlps(tiled, tiles=3)
    assert names and all(n.endswith(".mlp") for n in names)
    if checkpointed:
        checkpoint_blocks(tiled, offload=True)
    batch = next(iter(hf_batches(family if family == "gpt2" else "llama", n=4, batch_size=4, seq=16)))
    (loss, grads), (tiled_loss, tiled_grads) = _grads(model, batch), _grads(tiled, batch)
    torch.testing.assert_close(tiled_loss, loss, rtol=1e-5, atol=0)
    assert grads.keys() == tiled_grads.keys() and len(grads) == sum(1 for _ in model.parameters())
    for name, grad in grads.items():
        error = (tiled_grads[name] - grad).abs().max() / grad.abs().max().clamp_min(1e-30)
        assert error <= 1e-5, (name, float(error))
    untile_mlps(tiled)
    assert all("forward" not in m.__dict__ or m.__dict__.get("_lowvram_checkpointed") for m in tiled.modules())


def test_the_functional_form_takes_any_token_wise_module_and_a_lora_adapter_learns_through_it():
    mlp = nn.Sequential(nn.Linear(8, 64), nn.SiLU(), nn.Linear(64, 8))
    x = torch.randn(2, 40, 8, requires_grad=True)
    plain = mlp(x)
    (gx,) = torch.autograd.grad(plain.square().sum(), x)
    gw = torch.autograd.grad(mlp(x).square().sum(), mlp[0].weight)[0]
    out = tiled_mlp(mlp, x, tiles=7)
    torch.testing.assert_close(out, plain)
    (tx, tw) = torch.autograd.grad(out.square().sum(), (x, mlp[0].weight))
    torch.testing.assert_close(tx, gx)
    torch.testing.assert_close(tw, gw, rtol=1e-5, atol=1e-6)
    assert default_tiles(16384, 4096) == 4 and default_tiles(10, 4096) == 1
    lora = get_peft_model(causal_lm("llama"), LoraConfig(r=4, target_modules=["gate_proj", "down_proj"]))
    tile_mlps(lora, tiles=2)
    batch = next(iter(hf_batches("llama", n=2, batch_size=2, seq=16)))
    _, grads = _grads(lora, batch)
    assert grads and all("lora_" in n for n in grads) and any("gate_proj" in n for n in grads)


@pytest.mark.parametrize("checkpointed", [False, True])
def test_dropout_in_the_mlp_draws_per_tile_and_the_recompute_replays_those_masks(checkpointed):
    """A tile's dropout mask is drawn for the tile (the same distribution, not the untiled run's numbers); backward
    recomputes each tile with the same mask, so the gradients are those of the forward that ran."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 64), nn.GELU(), nn.Dropout(0.5), nn.Linear(64, 8))
    x = torch.randn(2, 30, 8, requires_grad=True)
    weights = [x, *mlp.parameters()]
    torch.manual_seed(3)
    reference = torch.cat([mlp(part.contiguous()) for part in x.tensor_split(3, dim=-2)], dim=-2)
    expected = torch.autograd.grad(reference.square().sum(), weights)
    torch.manual_seed(3)
    if checkpointed:
        out = torch.utils.checkpoint.checkpoint(tiled_mlp, mlp, x, 3, use_reentrant=False)
    else:
        out = tiled_mlp(mlp, x, tiles=3)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    for got, want in zip(torch.autograd.grad(out.square().sum(), weights), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _mlp_heavy():
    """A Llama whose MLP is 32x its hidden size: at 2048 tokens the MLP's intermediates rule the backward."""
    model = causal_lm("llama", hidden=64, intermediate_size=2048, num_hidden_layers=4, vocab=512)
    return HFModule(get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])))


def _long():
    ids = torch.randint(0, 512, (2, 1, 2048), generator=torch.Generator().manual_seed(0))
    return DataLoader([{"input_ids": row, "labels": row} for row in ids], batch_size=None)


def test_the_meter_sees_a_fraction_of_the_checkpointed_step_and_the_estimate_matches_it():
    def fit(tile):
        torch.manual_seed(0)
        report = MemoryReportCallback(stages=["fit"], print_table=False)
        checkpointing = ActivationCheckpointingCallback(offload=True, tile_mlp=tile)
        module = _mlp_heavy()
        quiet_trainer(max_steps=2, callbacks=[checkpointing, ChunkedCrossEntropyCallback(), report]).fit(
            module, _long()
        )
        return report.reports["fit"].total, checkpointing, module

    (plain, _, reference), (tiled, callback, module) = fit(False), fit(True)
    assert tiled <= 0.6 * plain, (tiled, plain)  # measured 0.19x here
    assert "4 MLPs tiled" in callback.summary()
    for (name, p), q in zip(reference.named_parameters(), module.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)  # the same training
    settings = {"activation_checkpointing": True, "offload_activations": True, "chunked_cross_entropy": True}
    estimate = estimate_step_memory(_mlp_heavy(), next(iter(_long())), tiled_mlp=True, **settings)
    assert abs(estimate.peak - tiled) <= 0.01 * tiled, (estimate, tiled)


def test_a_mixture_of_experts_and_bad_settings_are_refused_by_name():
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=2)  # fmt: skip
    with pytest.raises(ValueError, match=r"tiled MLP: .*(mixture of experts|found no MLP)"):
        mlp_modules(MixtralForCausalLM(config))
    with pytest.raises(ValueError, match="tiles must be an integer >= 1, got 0"):
        tiled_mlp(nn.Linear(4, 4), torch.randn(1, 8, 4), tiles=0)
    with pytest.raises(ValueError, match="tile_mlp must be true or false, got 'yes'"):
        ActivationCheckpointingCallback(tile_mlp="yes")
    with pytest.raises(ValueError, match="found no MLP"):
        quiet_trainer(max_steps=1, callbacks=[ActivationCheckpointingCallback(tile_mlp=True)]).fit(
            HFModule(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))), []
        )


@pytest.mark.usefixtures("no_cublas_workspace")
def test_the_planner_tiles_the_mlps_when_offloading_the_inputs_is_not_enough():
    import dataclasses

    from lightning_lowvram import gpu_profile, plan, plan_callbacks

    batch = next(iter(_long()))
    # bf16-mixed, as long-context runs are: in float32 the CUDA rules run this GQA model's attention on the math
    # kernel (the memory-efficient one takes no grouped-query inputs), whose L x L scores then rule the peak
    settings = {"activation_checkpointing": True, "offload_activations": True, "chunked_cross_entropy": True,
                "precision": "bf16-mixed"}  # fmt: skip
    card = dataclasses.replace(gpu_profile("rtx3060_12gb"), context_mib=0)
    offloaded = estimate_step_memory(_mlp_heavy(), batch, gpu=card, **settings).peak
    tiled = estimate_step_memory(_mlp_heavy(), batch, gpu=card, tiled_mlp=True, **settings).peak
    assert tiled < 0.6 * offloaded
    card = dataclasses.replace(card, memory_gib=(offloaded + tiled) / 2 / 0.9 / 2**30)
    result = plan(_mlp_heavy(), batch, card, precisions=("bf16-mixed",), allow_bf16_base=False)
    chosen = result.chosen
    assert chosen is not None and chosen.tiled_mlp and chosen.offload_activations, result.table()
    assert "MLP tiled" in chosen.label and chosen.estimate.peak == tiled
    assert "callbacks.lowvram_activation_checkpointing.tile_mlp=true" in result.overrides()
    (checkpointing,) = [c for c in plan_callbacks(result) if isinstance(c, ActivationCheckpointingCallback)]
    assert checkpointing.tile_mlp and checkpointing.offload
    roomy = plan(_mlp_heavy(), batch, dataclasses.replace(card, memory_gib=2 * offloaded / 2**30))
    assert roomy.chosen is not None and not roomy.chosen.tiled_mlp  # only when nothing else fits
