"""Lightning strategies (the Trainer's ``strategy``): FSDP2 for modules that do not shard themselves."""

from lightning_lowvram.strategies.fsdp2 import FSDP2Strategy

__all__ = ["FSDP2Strategy"]
