"""model=hf_causal_lm / hf_sequence_classifier: built from a config, a local directory or a Hub id, LoRA optional;
the same loss and gradients as the plain HF model; bad input named in one line."""

import pytest
import torch

from lightning_lowvram.models import HFCausalLM, HFSequenceClassifier
from tests.real_models.models import CAUSAL_FAMILIES, causal_lm

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 320, "head_dim": 8}  # fmt: skip


def _batch(vocab=300, n=2, seq=12):
    ids = torch.arange(n * seq).reshape(n, seq) % vocab + 1
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _config(model_type):
    if model_type == "gpt2":
        return {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 320}
    return {"model_type": model_type, **TINY}


@pytest.mark.parametrize("model_type", [f for f in CAUSAL_FAMILIES if f != "phi3"])
def test_a_config_builds_the_family_and_its_loss_is_hf_s(model_type):
    torch.manual_seed(0)
    module = HFCausalLM(config=_config(model_type))
    assert type(module.model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    assert module.model.config.model_type == model_type and module.vocab_size() == 320
    batch = _batch()
    module.eval()  # dropout off (GPT-2's config has it on): the two calls see the same model
    loss = module.training_step(batch, 0)
    assert torch.equal(loss, module.model(**batch).loss)  # outputs.loss, as the user's own module would return


def test_lora_trains_only_the_adapters_and_a_local_directory_loads_the_same_weights(tmp_path):
    torch.manual_seed(0)
    plain = HFCausalLM(config=_config("llama"))
    plain.model.save_pretrained(tmp_path)
    loaded = HFCausalLM(name=str(tmp_path))
    for (name, p), q in zip(plain.model.named_parameters(), loaded.model.parameters(), strict=True):
        assert torch.equal(p, q), name
    adapted = HFCausalLM(name=str(tmp_path), lora={"r": 4, "target_modules": ["q_proj", "v_proj"]})
    trained = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained) and len(trained) == 2 * 2 * 2  # A, B x q, v x 2 layers
    assert adapted.trainable_parameters() < adapted.total_parameters() // 10
    loss = adapted.training_step(_batch(), 0)
    assert torch.allclose(loss, plain.training_step(_batch(), 0))  # LoRA's B starts at zero: the same model
    opt = adapted.configure_optimizers()
    assert type(opt) is torch.optim.AdamW and sum(p.numel() for g in opt.param_groups for p in g["params"]) == (
        adapted.trainable_parameters()
    )


def test_a_sequence_classifier_keeps_its_head_trainable_under_lora():
    torch.manual_seed(0)
    config = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 64, "vocab_size": 320}  # fmt: skip
    module = HFSequenceClassifier(config=config, num_labels=3, lora={"r": 2})
    trained = [n for n, p in module.named_parameters() if p.requires_grad]
    assert any("classifier" in n for n in trained) and any("lora_" in n for n in trained)
    batch = {**_batch(), "labels": torch.tensor([0, 2])}
    assert module.training_step(batch, 0).ndim == 0
    module.eval()
    logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert module.predict_step(batch, 0).tolist() == logits.argmax(-1).tolist()


def test_bad_input_is_one_line_naming_the_argument(tmp_path, monkeypatch):
    import huggingface_hub

    with pytest.raises(ValueError, match=r"^name=./no-such-dir: neither a local directory nor a model Hugging Face"):
        HFCausalLM(name="./no-such-dir")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # a Hub id that is not cached, offline
    with pytest.raises(ValueError, match=r"^name=someone/missing-model: neither a local directory nor a model"):
        HFCausalLM(name="someone/missing-model")
    with pytest.raises(ValueError, match=f"^name={tmp_path}: a local directory without a model"):
        HFCausalLM(name=str(tmp_path))
    with pytest.raises(ValueError, match="give a model name .* or a config, not both or neither"):
        HFCausalLM()
    with pytest.raises(ValueError, match="needs a model_type"):
        HFCausalLM(config={"hidden_size": 32})
    with pytest.raises(ValueError, match=r"lora.target_modules=\['nope'\]: matches no module of LlamaForCausalLM; "
                                         r"its Linear layers are down_proj, gate_proj, k_proj"):  # fmt: skip
        HFCausalLM(config=_config("llama"), lora={"r": 4, "target_modules": ["nope"]})
    with pytest.raises(ValueError, match="lora: unknown key 'rank'; it takes r, alpha, dropout, target_modules"):
        HFCausalLM(config=_config("llama"), lora={"rank": 4})
    with pytest.raises(ValueError, match="lora.r must be an integer >= 0"):
        HFCausalLM(config=_config("llama"), lora={"r": -1})
    with pytest.raises(ValueError, match="num_labels must be an integer >= 2, got 1"):
        HFSequenceClassifier(config=_config("llama"), num_labels=1)


def test_the_causal_lm_the_tests_use_is_what_a_config_builds():
    torch.manual_seed(0)
    extra = {"vocab_size": 96, "max_position_embeddings": 4096, "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0}
    ours = HFCausalLM(config={**_config("llama"), **extra})
    theirs = causal_lm("llama")
    assert [p.shape for p in ours.model.parameters()] == [p.shape for p in theirs.parameters()]
