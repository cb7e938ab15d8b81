import pytest
import torch
from torch import nn

from lightning_lowvram.cores.pruning import (
    apply_masks,
    cubic_sparsity,
    output_layers,
    prunable_layers,
    prune_structured,
    replay_structure,
    update_masks,
)
from lightning_lowvram.demo import TinyGPT


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))


def test_structured_pruning_shrinks_hidden_layers_and_keeps_the_output():
    model, x = _mlp(), torch.randn(4, 8)
    prune_structured(model, 0.5, x)
    assert [model[0].out_features, model[2].in_features, model[2].out_features, model[4].in_features] == [16] * 4
    assert model[0].in_features == 8 and model[4].out_features == 3
    assert model(x).shape == (4, 3)


def test_replaying_the_record_on_a_fresh_module_rebuilds_shapes_and_outputs():
    torch.manual_seed(0)
    gpt, idx = TinyGPT(seq_len=16, d_model=32, n_head=4, n_layer=2), torch.randint(0, 256, (2, 16))
    ops = prune_structured(gpt, 0.5, idx) + prune_structured(gpt, 0.25, idx)
    fresh = TinyGPT(seq_len=16, d_model=32, n_head=4, n_layer=2)
    replay_structure(fresh, ops, idx)
    fresh.load_state_dict(gpt.state_dict())
    assert torch.equal(fresh(idx), gpt(idx))
    attn = gpt.blocks[0].attn
    assert attn.qkv.out_features == 3 * attn.proj.in_features and attn.proj.in_features % attn.n_head == 0


def test_modes_are_kept_and_random_criterion_is_seeded():
    a, b, x = _mlp(), _mlp(), torch.randn(4, 8)
    a.train()
    ops_a = prune_structured(a, 0.5, x, criterion="random", seed=3)
    ops_b = prune_structured(b, 0.5, x, criterion="random", seed=3)
    assert ops_a == ops_b and a.training and all(m.training for m in a.modules())


def test_output_layer_and_ignore_patterns():
    model, x = _mlp(), torch.randn(1, 8)
    assert output_layers(model, x) == ["4"]
    assert list(prunable_layers(model, ignore=["2"], protected=["4"])) == ["0"]
    with pytest.raises(ValueError, match="ignore pattern 'blocks.*' matches no prunable layer"):
        prunable_layers(model, ignore=["blocks.*"])
    with pytest.raises(ValueError, match="nothing to prune"):
        prunable_layers(model, ignore=["*"])
    with pytest.raises(ValueError, match="criterion must be one of 'magnitude', 'random', got 'taylor'"):
        prune_structured(model, 0.5, x, criterion="taylor")


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("criterion", ["magnitude", "random"])
def test_masks_are_bool_hit_the_target_and_only_grow(scope, criterion):
    model = _mlp()
    layers = {"0": model[0], "2": model[2]}
    first = update_masks(layers, 0.3, criterion=criterion, scope=scope, generator=torch.Generator().manual_seed(0))
    second = update_masks(layers, 0.6, first, criterion=criterion, scope=scope, generator=torch.Generator())
    total = sum(m.numel() for m in second.values())
    assert all(m.dtype == torch.bool for m in second.values())
    assert sum(int((~m).sum()) for m in first.values()) == pytest.approx(0.3 * total, abs=2)
    assert sum(int((~m).sum()) for m in second.values()) == pytest.approx(0.6 * total, abs=2)
    assert all(bool((s <= f).all()) for f, s in zip(first.values(), second.values(), strict=True))  # pruned stay so
    bias = model[0].bias.detach().clone()
    apply_masks(layers, second)
    assert all(bool((layers[n].weight[~m] == 0).all()) for n, m in second.items())
    assert torch.equal(model[0].bias, bias)


def test_cubic_schedule_is_zhu_and_gupta():
    values = [cubic_sparsity(t, 0.8, 10, 110, 10) for t in range(0, 130, 10)]
    assert values[0] == 0 and values[1] == 0 and values[-1] == values[-2] == 0.8
    assert all(a <= b for a, b in zip(values, values[1:], strict=False))
    assert cubic_sparsity(60, 0.8, 10, 110, 10) == pytest.approx(0.8 * (1 - 0.5**3))
    assert cubic_sparsity(65, 0.8, 10, 110, 10) == cubic_sparsity(60, 0.8, 10, 110, 10)  # held between steps


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.BatchNorm2d(32)
        )
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


class MHANet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.attn = nn.MultiheadAttention(32, num_heads=4, batch_first=True)
        self.norm = nn.LayerNorm(32)
        self.out = nn.Linear(32, 50)

    def forward(self, idx):
        x = self.embed(idx)
        return self.out(self.norm(x + self.attn(x, x, x, need_weights=False)[0]))


@pytest.mark.parametrize(
    ("make", "example"),
    [(ConvNet, lambda: torch.randn(2, 1, 8, 8)), (MHANet, lambda: torch.randint(0, 50, (2, 6)))],
    ids=["conv_batchnorm", "multihead_attention"],
)
def test_conv_batchnorm_and_multihead_attention_shrink_and_replay(make, example):
    torch.manual_seed(0)
    model, x = make(), example()
    before = sum(p.numel() for p in model.parameters())
    ops = prune_structured(model, 0.5, x)
    assert sum(p.numel() for p in model.parameters()) < 0.6 * before
    fresh = make()
    replay_structure(fresh, ops, x)
    fresh.load_state_dict(model.state_dict())
    model.eval(), fresh.eval()
    assert torch.equal(fresh(x), model(x))
    if isinstance(model, MHANet):
        attn = model.attn
        assert attn.embed_dim == attn.in_proj_weight.shape[1] and attn.embed_dim % attn.num_heads == 0
    else:
        assert model.features[1].num_features == model.features[0].out_channels == 8


def test_the_meta_copy_that_checks_a_pruning_copies_no_weights_and_no_trainer():
    from lightning_lowvram.cores.pruning import _meta_twin
    from lightning_lowvram.demo import TinyGPT

    module = TinyGPT(seq_len=16, d_model=32, n_head=4, n_layer=2)
    module._trainer = object()  # what Lightning sets while a fit runs: the twin must not deep-copy it
    twin = _meta_twin(module)
    assert twin._trainer is None and module._trainer is not None
    assert all(p.is_meta for p in twin.parameters()) and not any(p.is_meta for p in module.parameters())
    assert [p.shape for p in twin.parameters()] == [p.shape for p in module.parameters()]
