"""LightningModules for the models users bring from the command line (``model=hf_causal_lm``...)."""

from lightning_lowvram.models.hf import HFCausalLM, HFSequenceClassifier

__all__ = ["HFCausalLM", "HFSequenceClassifier"]
