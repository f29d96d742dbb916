"""Data-parallel training under ``torchrun``: the process group, the DDP wrapper, per-rank batch slices.

torchrun starts one process per device and sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``;
:func:`init` reads them and initialises the process group (NCCL on GPU, gloo on CPU). Without them,
or with ``WORLD_SIZE=1``, :class:`World` is rank 0 of 1 and every method is the identity or a no-op,
so single-process training runs exactly the code it ran before.

The global batch does not depend on the world size. An optimizer step consumes
``batch_size × grad_accum`` rows of the seeded row stream however many processes share it: each
global micro-batch of ``batch_size`` rows is cut into ``world_size`` equal slices and rank ``r``
trains on slice ``r`` (so ``batch_size`` must be a multiple of the world size). DDP averages the
gradients over ranks, and the mean of per-rank means is the global mean because every packed row
trains on all its positions (equal token counts per slice): N processes follow the single-process
loss trajectory up to float rounding, the training fingerprint does not change with N, and a
checkpoint (the unwrapped model's state) resumes under any world size. Terms on teacher samples
(completions of varying length) weigh each rank's token mean equally, so there N processes match
one process closely but not to rounding.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from distill_core.errors import ConfigError


@dataclass(frozen=True)
class World:
    """This process's place among the training processes; the default is rank 0 of 1."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, the final model and the run record."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """A CUDA device becomes this process's own GPU (``LOCAL_RANK``)."""
        if self.distributed and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` in DistributedDataParallel (which broadcasts rank 0's weights); itself on one process."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def shard(self, batch):
        """This rank's equal slice of a global micro-batch (a StepBatch, Batch or BeamBatch): rows, or whole
        prompts with all their beam candidates, ``rank·b .. (rank+1)·b``."""
        if not self.distributed:
            return batch
        if batch.groups % self.size:
            raise ConfigError(
                f"train.batch_size {batch.groups} is not a multiple of the {self.size} training processes: each process "
                f"takes an equal slice of every micro-batch. Use a batch_size divisible by {self.size}."
            )
        return batch.shard(self.rank, self.size)

    def grad_sync(self, model: torch.nn.Module, sync: bool):
        """Context for a micro-batch's forward and backward: DDP all-reduces gradients only when ``sync``
        (the step's last micro-batch), not once per micro-batch."""
        if self.distributed and not sync:
            return model.no_sync()
        return nullcontext()

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Each value averaged over ranks (one all-reduce); the values themselves on one process."""
        if not self.distributed:
            return values
        t = torch.tensor(list(values.values()), dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return {k: v / self.size for k, v in zip(values, t.tolist())}

    def sum(self, value: int) -> int:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self._comm_device())
        dist.all_reduce(t)
        return int(t.item())

    def barrier(self) -> None:
        """Wait for every rank, e.g. until rank 0 has committed a checkpoint."""
        if not self.distributed:
            return
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[self.local_rank])
        else:
            dist.barrier()

    def _comm_device(self) -> torch.device:
        # NCCL reduces only tensors on the rank's GPU; gloo only CPU tensors.
        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")


def init(device: torch.device) -> World:
    """The current process group, or one initialised from torchrun's environment; rank 0 of 1 without one."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={size} but this torch build has no torch.distributed: run one process.")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), local_rank)


def shutdown() -> None:
    """Destroy the process group when one was initialised (call once, at the end of the entry point)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
