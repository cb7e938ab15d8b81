"""Two CPU processes (FSDP2 through ModelParallelStrategy, gloo) with AutoMicroBatchCallback; run by
test_auto_micro_batch, re-launched per rank.

Usage: ``python tests/callbacks/fsdp2_micro_batch.py OUT_DIR MICRO_BATCH_SIZE RANK1_BUDGET_BYTES ACCUMULATE [ours]``
(size ``none``: no callback; budget 0: none; the budget starts at batch 1, mid-window when ACCUMULATE > 1; ``ours``:
WideNet as it is, without configure_model, under lightning_lowvram's FSDP2Strategy instead). Each
rank writes ``OUT_DIR/rank<r>.pt``: the full (unsharded) weights, the callback's state, its peak bytes and its
parameter bytes (our meter).
"""

import sys

from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard

from tests.callbacks.ddp_micro_batch import RankOneBudget, fit_two_ranks


def sharded_net():
    """WideNet whose layers and root ``fully_shard`` in ``configure_model`` (FSDP2), as Lightning's docs write it."""
    from tests.callbacks.test_auto_micro_batch import WideNet

    class ShardedWideNet(WideNet):
        def configure_model(self):
            for layer in self.net:
                if any(True for _ in layer.parameters()):
                    fully_shard(layer, mesh=self.device_mesh["data_parallel"])
            fully_shard(self, mesh=self.device_mesh["data_parallel"])

    return ShardedWideNet()


def full_weights(module):
    """The unsharded weights (each rank gathers them: a collective)."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in
            module.state_dict().items()}  # fmt: skip


def main(out: str, size: str, limit: str, accumulate: str, strategy: str = "model_parallel") -> None:
    import lightning as L

    from lightning_lowvram import FSDP2Strategy
    from tests.callbacks.test_auto_micro_batch import WideNet

    L.seed_everything(0)
    if strategy == "ours":
        model, parallel = WideNet(), FSDP2Strategy()
    else:
        model, parallel = sharded_net(), ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    fit_two_ranks(
        model, out, size, RankOneBudget(int(limit), start=1), weights=full_weights, accelerator="cpu",
        strategy=parallel, accumulate_grad_batches=int(accumulate),
    )  # fmt: skip


if __name__ == "__main__":
    main(*sys.argv[1:])
