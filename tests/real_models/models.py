"""Tiny random-init versions of the architectures users bring, wrapped the way users write LightningModules.

HF GPT-2 (``Conv1D``, tied embeddings), Llama (grouped-query attention, RoPE), BERT for sequence classification
(padded batches) and a ResNet-style Conv+BatchNorm net (torchvision does not import beside the CPU torch here, so the
net is our own: basic blocks with a strided 1x1 shortcut, as in ``resnet18``). No weights are downloaded.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import GPT2Config, GPT2LMHeadModel

from lightning_lowvram.demo.hf import VOCAB, HFModule, hf_batches, hf_model
from lightning_lowvram.demo.resnet import ResNetModule, TinyResNet, image_batches, resnet18

__all__ = [
    "CAUSAL_FAMILIES", "HF_NAMES", "NAMES", "VOCAB", "HFModule", "ResNetModule", "TinyResNet", "build", "causal_lm",
    "first_batch", "hf_batches", "hf_model", "image_batches", "resnet18",
]  # fmt: skip
HF_NAMES = ("gpt2", "llama", "bert")
NAMES = (*HF_NAMES, "resnet")


def build(name: str, **kwargs) -> tuple[L.LightningModule, DataLoader]:
    """The module and its training loader for one of :data:`NAMES`."""
    if name == "resnet":
        return ResNetModule(), image_batches(**kwargs)
    return HFModule(hf_model(name)), hf_batches(name, **kwargs)


def first_batch(name: str, **kwargs):
    return next(iter(build(name, **kwargs)[1]))


CAUSAL_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2")


def causal_lm(model_type: str, vocab: int = VOCAB, hidden: int = 32, **overrides) -> nn.Module:
    """A tiny random-init HF causal LM of ``model_type`` from its config (no download), dropout off.

    Gemma-2 gets a small ``final_logit_softcapping`` so the capping is exercised, not saturated or idle.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    if model_type == "gpt2":
        return (
            hf_model("gpt2", hidden=hidden)
            if vocab == VOCAB and not overrides
            else GPT2LMHeadModel(
                GPT2Config(**{**hf_model("gpt2", hidden=hidden).config.to_dict(), "vocab_size": vocab, **overrides})
            )
        )
    kwargs = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=4096,
        attention_dropout=0.0, pad_token_id=0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    if model_type == "gemma2":
        kwargs |= {"final_logit_softcapping": 2.0, "attn_logit_softcapping": None, "query_pre_attn_scalar": hidden // 4}
    config = AutoConfig.for_model(model_type, **{**kwargs, **overrides})
    return AutoModelForCausalLM.from_config(config)
