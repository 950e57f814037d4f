"""Sharded data parallel training (FSDP2, ``torch.distributed.fsdp.fully_shard``) through Lightning's
``ModelParallelStrategy``: ``python train.py trainer=fsdp`` (gloo on CPUs, NCCL on GPUs).

Lightning's ``FSDPStrategy`` (FSDP1) refuses CPUs; ``ModelParallelStrategy`` builds a device mesh and leaves the
sharding to the module's ``configure_model``. :class:`FullyShardedStrategy` is that strategy with the mesh every
FSDP user wants, all ranks on one data-parallel axis (``data_parallel_size`` = every process, ``tensor_parallel_size``
= 1), and :func:`shard` is what :class:`mhaplug.training.lit.LitDecoderLM` does with it: each decoder block a unit
of its own (its parameters gathered just before it runs and freed after), then the root (embeddings, final norm,
head). Validation and the step-0 mask audit run with the parameters :func:`gathered` (one all-gather each), so
that every rank makes its own forwards: the ranks may hold different numbers of validation batches, as under DDP,
and the cost is the whole model's parameters in memory meanwhile. Gradients are averaged over ranks as under DDP,
so the same steps give the same weights. Checkpoints are distributed (a folder with one shard per rank,
``torch.distributed.checkpoint``), and resume on the same number of ranks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pytorch_lightning.strategies import ModelParallelStrategy
from torch import nn

__all__ = ["FullyShardedStrategy", "gathered", "shard"]


class FullyShardedStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` on a one-dimensional data-parallel mesh over all processes (pure FSDP)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # every rank shards the same model
        super().setup_environment()


def shard(model: nn.Module, blocks: nn.ModuleList, device_mesh: Any, *, methods: tuple[str, ...] = ()) -> None:
    """``fully_shard`` each of ``blocks``, then ``model`` (the parameters left: embeddings, norms, head), over the
    mesh's data-parallel axis. ``methods``: the model's methods other than ``forward`` that run it (FSDP gathers
    the root's parameters around ``forward`` only, unless told of the others)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = device_mesh["data_parallel"]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for method in methods:
        register_fsdp_forward_method(model, method)


@contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """Inside the block, every ``fully_shard`` unit of ``module`` holds its whole parameters and keeps them across
    forwards, so a forward makes no collective (and ranks may make different numbers of them); resharded after.
    Entering and leaving are collectives (every rank must do both). A module that is not sharded: nothing happens."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)
