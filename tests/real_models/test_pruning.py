"""PruningCallback on the architectures users bring: HF GPT-2 / Llama (GQA) / BERT and a Conv+BatchNorm ResNet."""

import time

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_lowvram import PruningCallback, load_pruned
from lightning_lowvram.cores.pruning import prune_structured
from lightning_lowvram.cores.pruning_units import find_units
from tests.helpers import quiet_trainer
from tests.real_models.models import HF_NAMES, NAMES, build, hf_batches, hf_model


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _outputs(module, batch):
    with torch.no_grad():
        if isinstance(batch, list):
            return module(batch[0])
        return module.model(**batch).logits


def _loss(module, batch):
    if isinstance(batch, list):
        return nn.functional.cross_entropy(module(batch[0]), batch[1])
    return module.model(**batch).loss


def _block_params(module: nn.Module) -> int:
    """Parameters of the transformer blocks (attention + MLP units), or of the whole net for the CNN."""
    units = find_units(module)
    if not units:
        return _params(module)
    return sum(p.numel() for u in units for p in u.module.parameters())


@pytest.mark.parametrize("schedule", ["once", "gradual"])
@pytest.mark.parametrize("name", NAMES)
def test_structured_half_keeps_a_valid_model_that_trains_on(name, schedule):
    module, loader = build(name)
    batch = next(iter(loader))
    before, blocks_before = _params(module), _block_params(module)
    groups = {u.name: u.groups for u in find_units(module)}
    shape = _outputs(module, batch).shape
    callback = PruningCallback(0.5, schedule=schedule, start_step=0, end_step=4, frequency=2)
    start = time.perf_counter()
    quiet_trainer(max_steps=6, callbacks=[callback]).fit(module, loader)
    assert time.perf_counter() - start < 60  # never a hang: seconds on these tiny configs
    assert _params(module) < before
    assert _block_params(module) <= 0.55 * blocks_before
    assert _outputs(module, batch).shape == shape
    assert torch.isfinite(_loss(module, batch))
    assert callback.fraction == 0.5
    if name == "resnet":
        return
    assert {u.name: u.groups for u in find_units(module)} == {name: n // 2 for name, n in groups.items()}
    hf = module.model
    if name != "bert":
        ids = batch["input_ids"][:2]
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, min_new_tokens=3, do_sample=False)
        assert out.shape == (2, ids.shape[1] + 3)


def test_heads_go_whole_and_gqa_keeps_its_groups():
    gpt2, llama, bert = (hf_model(n) for n in HF_NAMES)
    for model in (gpt2, llama, bert):
        batch = next(iter(hf_batches("bert" if model is bert else "gpt2")))
        prune_structured(model, 0.5, batch)
    attn = gpt2.transformer.h[0].attn
    assert (attn.num_heads, attn.head_dim, attn.split_size, attn.c_attn.weight.shape) == (2, 16, 32, (64, 96))
    assert gpt2.transformer.h[0].mlp.c_fc.nf == 128
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight  # tied embeddings stay tied (hidden size kept)
    attn = llama.model.layers[0].self_attn
    assert attn.head_dim == 16 and attn.num_key_value_groups == 2
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.o_proj.in_features) == (32, 16, 32)
    config = llama.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (2, 1, 64)
    rebuilt = type(llama)(config)  # the config describes the pruned model
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in llama.state_dict().items()}
    attn = bert.bert.encoder.layer[0].attention.self
    assert (attn.num_attention_heads, attn.attention_head_size, attn.all_head_size) == (2, 16, 32)


def test_an_unknown_attention_layout_is_a_clear_error_naming_it():
    class FancyAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.wq, self.wo = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.wo(self.wq(x).softmax(-1))

    model = nn.Sequential(nn.Linear(4, 8), FancyAttention(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"1 \(FancyAttention\)"):
        prune_structured(model, 0.5, torch.zeros(2, 4))
    prune_structured(model, 0.5, torch.zeros(2, 4), ignore=["1*"])  # left alone when asked
    assert model[1].wq.out_features == 8


def test_global_scope_on_transformer_blocks_is_refused_at_setup():
    module, loader = build("llama")
    with pytest.raises(ValueError, match="scope='layer'"):
        quiet_trainer(max_steps=1, callbacks=[PruningCallback(0.5, scope="global")]).fit(module, loader)


@pytest.mark.parametrize("name", NAMES)
def test_checkpoints_from_any_point_of_the_schedule_load(name, tmp_path):
    module, loader = build(name)
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    callback = PruningCallback(0.5, start_step=0, end_step=4, frequency=2)
    trainer = quiet_trainer(max_steps=6, callbacks=[callback, saver], enable_checkpointing=True)
    trainer.fit(module, loader)
    assert callback.events == [2, 4]
    for step in (1, 2, 3, 6):  # before pruning, during (two points) and after
        ckpt = tmp_path / f"step={step}.ckpt"
        saved = torch.load(ckpt, weights_only=True)["state_dict"]
        tester = quiet_trainer(callbacks=[PruningCallback(0.5, start_step=0, end_step=4, frequency=2)])
        tester.test(module, loader, ckpt_path=ckpt, verbose=False)  # the fully pruned module takes the ckpt's shapes
        assert all(torch.equal(v, saved[k]) for k, v in module.state_dict().items())
        fresh = load_pruned(build(name)[0], ckpt)
        assert all(torch.equal(v, saved[k]) for k, v in fresh.state_dict().items())
    resumed, _ = build(name)
    again = PruningCallback(0.5, start_step=0, end_step=4, frequency=2)
    quiet_trainer(max_steps=6, callbacks=[again]).fit(resumed, loader, ckpt_path=tmp_path / "step=3.ckpt")
    assert again.events == [2, 4]
    assert {k: v.shape for k, v in resumed.state_dict().items()} == {k: v.shape for k, v in module.state_dict().items()}


def test_gpt2_conv1d_layers_are_masked_by_unstructured_pruning():
    module, loader = build("gpt2")
    callback = PruningCallback(0.5, method="unstructured", schedule="once")
    quiet_trainer(max_steps=2, callbacks=[callback]).fit(module, loader)
    conv1d = [n for n in callback._layers if n.endswith(("c_attn", "c_fc", "c_proj"))]
    assert len(conv1d) == 8  # 2 layers x (c_attn, attn.c_proj, c_fc, mlp.c_proj)
    weight = module.model.transformer.h[0].attn.c_attn.weight
    assert abs(float((weight == 0).float().mean()) - 0.5) < 0.01
    assert "model.lm_head" not in callback._layers  # the output layer (tied to the embeddings) is never masked


def test_batch_encoding_batches_work_like_dicts():
    module, _ = build("bert")
    loader = hf_batches("bert", encoding=True)
    quiet_trainer(max_steps=2, callbacks=[PruningCallback(0.5, schedule="once")]).fit(module, loader)
    assert module.model.bert.encoder.layer[0].attention.self.num_attention_heads == 2


def test_lightnings_own_demo_transformer_with_forward_of_two_inputs():
    from lightning.pytorch.demos import LightningTransformer

    class NoDownload(LightningTransformer):
        def prepare_data(self):  # the demo fetches WikiText-2 here; the test brings its own tokens
            pass

    torch.manual_seed(0)
    module = NoDownload(vocab_size=64)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randint(0, 64, (8, 12), generator=g), torch.randint(0, 64, (8, 12), generator=g)
    )
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    before = _params(module)
    quiet_trainer(max_steps=2, callbacks=[PruningCallback(0.5, schedule="once")]).fit(module, loader)
    assert _params(module) < before


class PositionalNet(nn.Module):
    """A positional-encoding buffer added to the embeddings: a width the dependency graph cannot see."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.register_buffer("pe", torch.randn(1, 16, 32))
        self.hidden = nn.Linear(32, 32)
        self.out = nn.Linear(32, 50)

    def forward(self, idx):
        return self.out(torch.relu(self.hidden(self.embed(idx) + self.pe[:, : idx.shape[1]])))


def test_a_model_the_pruned_graph_would_break_is_an_error_at_setup_and_left_untouched():
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = PositionalNet()

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self.net(batch[0]).flatten(0, 1), batch[1].flatten())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Module()
    weights = {k: v.clone() for k, v in module.state_dict().items()}
    ids = torch.randint(0, 50, (8, 16))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, ids), batch_size=4)
    with pytest.raises(ValueError, match="leaves Module unable to run .*method='unstructured'"):
        quiet_trainer(max_steps=1, callbacks=[PruningCallback(0.5)]).fit(module, loader)
    assert all(torch.equal(v, weights[k]) for k, v in module.state_dict().items())


def test_load_pruned_refuses_another_architecture_naming_the_layer(tmp_path):
    module, loader = build("gpt2")
    saver = ModelCheckpoint(dirpath=tmp_path, filename="last")
    trainer = quiet_trainer(
        max_steps=2, callbacks=[PruningCallback(0.5, schedule="once"), saver], enable_checkpointing=True
    )
    trainer.fit(module, loader)
    from tests.real_models.models import HFModule

    with pytest.raises(
        ValueError, match=r"pruned from another model: 'model.transformer.wte' started with 64 channels there, 32 here"
    ):
        load_pruned(HFModule(hf_model("gpt2", hidden=32)), tmp_path / "last.ckpt")
    with pytest.raises(ValueError, match=r"'model.transformer.h.2.attn.c_attn.bias' is only in HFModule"):
        load_pruned(HFModule(hf_model("gpt2", layers=3)), tmp_path / "last.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="not a Lightning checkpoint written while PruningCallback ran"):
        load_pruned(build("gpt2")[0], tmp_path / "plain.ckpt")
