"""Structured pruning recognises layouts by structure: T5's encoder-decoder and the families the code never names.

Every model type in transformers' causal, masked and sequence-to-sequence tables is built from its own config at a
tiny size; structured pruning then either gives a model that runs (same output shape, finite loss, fewer
parameters) or refuses it, before any weight changes, with one line naming the layout.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from torch import nn

from lightning_lowvram.cores.pruning import prune_structured
from lightning_lowvram.cores.pruning_units import conform_to_state_dict, find_units

transformers.logging.set_verbosity_error()

# the usual names of a config's sizes (attribute_map covers the rest: n_embd, d_model, num_heads, ...)
SIZES = dict(
    hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, num_hidden_layers=2,
    vocab_size=256, head_dim=16, max_position_embeddings=128, n_embd=64, n_head=4, n_layer=2, n_inner=128,
    d_model=64, num_heads=4, d_ff=128, num_layers=2, d_kv=16, decoder_start_token_id=0, pad_token_id=0,
)  # fmt: skip
KINDS = {
    "causal": (transformers.AutoModelForCausalLM, "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    "masked": (transformers.AutoModelForMaskedLM, "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    "seq2seq": (transformers.AutoModelForSeq2SeqLM, "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
}


def tiny_config(model_type: str) -> transformers.PretrainedConfig:
    """The family's default config with its sizes set small (only the sizes it has)."""
    config = transformers.AutoConfig.for_model(model_type)
    for key, value in SIZES.items():
        if isinstance(getattr(config, key, None), int) or (key.endswith("token_id") and hasattr(config, key)):
            try:
                setattr(config, key, value)
            except (AttributeError, ValueError):
                pass
    return config


def _inputs(kind: str, ids: torch.Tensor) -> dict:
    return {"input_ids": ids, "use_cache": False, **({"decoder_input_ids": ids} if kind == "seq2seq" else {})}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _prune_and_run(kind: str, model_type: str) -> str:
    """'pruned', 'refused: <line>', or why the family is not a case (composite, too big, its plain forward fails)."""
    auto, _ = KINDS[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            config = tiny_config(model_type)
            if any(hasattr(getattr(config, a, None), "to_dict") for a in ("text_config", "vision_config", "encoder")):
                return "composite"
            with torch.device("meta"):
                if _params(auto.from_config(config)) > 30e6:
                    return "big"
            torch.manual_seed(0)
            model = auto.from_config(config).eval()
        except Exception as exc:  # a family whose config does not take these sizes
            return f"cannot build at a tiny size ({type(exc).__name__})"
        ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
        inputs = _inputs(kind, ids)
        try:
            with torch.no_grad():
                shape = model(**inputs).logits.shape
                model(**inputs, labels=ids)
        except Exception:
            return "plain forward fails"
        if not find_units(model):
            return "no units"
        before, state = _params(model), {k: v.clone() for k, v in model.state_dict().items()}
        try:
            prune_structured(model, 0.5, inputs)
        except ValueError as exc:
            message = str(exc)
            assert "\n" not in message and message.startswith("structured pruning"), message
            assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), "a refusal changed weights"
            return f"refused: {message}"
        with torch.no_grad():
            out = model(**inputs, labels=ids)
    assert out.logits.shape == shape and torch.isfinite(out.loss), model_type
    assert _params(model) < before, model_type
    return "pruned"


def _t5(gated: bool = False) -> transformers.T5ForConditionalGeneration:
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=256, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2, num_decoder_layers=2,
        decoder_start_token_id=0, pad_token_id=0, feed_forward_proj="gated-gelu" if gated else "relu",
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration(config).eval()


@pytest.mark.parametrize("gated", [False, True])
def test_t5_loses_the_same_heads_in_every_block_of_a_stack_and_its_relative_bias_columns(gated):
    model = _t5(gated)
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "decoder_input_ids": ids}
    names = {u.name: u.groups for u in find_units(model)}
    # the blocks of a stack share the position bias block 0 computes: one unit per stack and role
    assert names["encoder.block.*.layer.*.SelfAttention"] == 4
    assert names["decoder.block.*.layer.*.SelfAttention"] == 4
    assert names["decoder.block.*.layer.*.EncDecAttention"] == 4
    prune_structured(model, 0.5, inputs)
    for stack in (model.encoder, model.decoder):
        bias = stack.block[0].layer[0].SelfAttention.relative_attention_bias
        assert bias.weight.shape == (32, 2) and bias.embedding_dim == 2
        for block in stack.block:
            attn = block.layer[0].SelfAttention
            assert (attn.n_heads, attn.inner_dim, attn.q.out_features, attn.o.in_features) == (2, 32, 32, 32)
            ff = block.layer[-1].DenseReluDense
            assert ff.wo.in_features == 64 and all(
                getattr(ff, a).out_features == 64 for a in ("wi", "wi_0") if hasattr(ff, a)
            )
    assert model.decoder.block[1].layer[1].EncDecAttention.n_heads == 2
    config = model.config
    assert (config.num_heads, config.d_ff) == (2, 64)
    with torch.no_grad():
        out = model(**inputs, labels=ids)
    assert out.logits.shape == (2, 10, 256) and torch.isfinite(out.loss)
    generated = model.generate(ids[:1], max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 4)
    rebuilt = type(model)(config)  # the config describes the pruned model
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    fresh = _t5(gated)  # and a checkpoint of it loads into the unpruned shapes
    conform_to_state_dict(fresh, model.state_dict())
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kind", "model_type"),
    [
        ("causal", "olmo2"),  # a q_norm over the whole query width: pruned with the heads
        ("causal", "gpt_oss"),  # attention sinks, one per head
        ("causal", "starcoder2"),  # a plain MLP of Linear c_fc/c_proj
        ("causal", "opt"),  # fc1/fc2 straight in the decoder layer
        ("masked", "megatron-bert"),  # a LayerNorm of the model's width inside the attention block: kept
        ("seq2seq", "bart"),  # encoder-decoder with cross-attention
        ("seq2seq", "umt5"),  # a relative position bias in every block
    ],
)
def test_families_the_code_never_names_prune_into_models_that_run(kind, model_type):
    assert _prune_and_run(kind, model_type) == "pruned"


def test_a_layout_the_rules_misread_is_refused_before_any_weight_changes():
    # DiffLlama splits its heads in two halves: the meta-device copy of the pruned model does not run
    result = _prune_and_run("causal", "diffllama")
    assert result.startswith("refused: structured pruning at amount=0.5 would leave the model unable to run")
    assert "DiffLlamaAttention" in result and "ignore=" in result


@pytest.mark.slow
def test_every_family_transformers_ships_prunes_into_a_model_that_runs_or_is_refused_by_name():
    from transformers.models.auto import modeling_auto

    results = {}
    for kind, (_, table) in KINDS.items():
        for model_type in sorted(getattr(modeling_auto, table)):
            results[(kind, model_type)] = _prune_and_run(kind, model_type)
    pruned = sorted(t for (_, t), r in results.items() if r == "pruned")
    refused = sorted(t for (_, t), r in results.items() if r.startswith("refused"))
    print(f"{len(pruned)} pruned, {len(refused)} refused by name, of {len(results)}")
    named_in_code = {"llama", "mistral", "qwen2", "gpt2", "bert", "roberta", "opt", "t5"}
    assert len(set(pruned) - named_in_code) >= 100, pruned
    assert {"t5", "mt5", "longt5", "bart", "qwen3", "gemma2", "olmo2", "starcoder2", "electra"} <= set(pruned)
