"""Demo models and data that need no download: digits MLP, a tiny byte-level GPT, tiny HF models, a ResNet-style net."""

from lightning_lowvram.demo.digits import DigitsDataModule, DigitsMLP
from lightning_lowvram.demo.gpt import TinyGPT, TinyTextDataModule

__all__ = ["DigitsDataModule", "DigitsMLP", "TinyGPT", "TinyTextDataModule"]
