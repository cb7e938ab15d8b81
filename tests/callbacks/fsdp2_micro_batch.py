"""Two CPU processes (FSDP2 through ModelParallelStrategy, gloo) with AutoMicroBatchCallback; run by
test_auto_micro_batch, re-launched per rank.

Usage: ``python tests/callbacks/fsdp2_micro_batch.py OUT_DIR MICRO_BATCH_SIZE RANK1_BUDGET_BYTES ACCUMULATE``
(size ``none``: no callback; budget 0: none; the budget starts at batch 1, mid-window when ACCUMULATE > 1). Each
rank writes ``OUT_DIR/rank<r>.pt``: the full (unsharded) weights, the callback's state, its peak bytes and its
parameter bytes (our meter).
"""

import sys

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard

from lightning_lowvram import AutoMicroBatchCallback, MemoryReportCallback
from tests.callbacks.ddp_micro_batch import BATCHES, PER_RANK_BATCH, OrderedDigits, RankOneBudget
from tests.helpers import quiet_trainer


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


def main(out: str, size: str, limit: str, accumulate: str) -> None:
    import lightning as L

    L.seed_everything(0)
    model = sharded_net()
    data = OrderedDigits(batch_size=PER_RANK_BATCH, dtype="float64")
    data.setup("fit")
    micro = AutoMicroBatchCallback(micro_batch_size=int(size) if size.isdigit() else "auto")
    report = MemoryReportCallback(stages=["fit"], print_table=False)
    trainer = quiet_trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_epochs=1,
        use_distributed_sampler=False,
        limit_train_batches=BATCHES,
        limit_val_batches=0,
        accumulate_grad_batches=int(accumulate),
        callbacks=([] if size == "none" else [micro]) + [report, RankOneBudget(int(limit), start=1)],
    )
    trainer.fit(model, datamodule=data)
    stats = report.reports["fit"]
    state = {"weights": full_weights(model), "micro": micro.state_dict(), "peak": stats.total}
    state["params"] = stats.by_category["parameters"]
    state["micro_batch_size"] = micro.micro_batch_size
    torch.save(state, f"{out}/rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
