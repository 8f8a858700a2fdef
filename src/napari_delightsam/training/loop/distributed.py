"""torch.distributed set-up for runs launched by ``torchrun`` (single- or multi-node).

``DistContext.from_env()`` reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (set by torchrun);
with a world size above 1 it initialises the default process group — NCCL when the run uses
CUDA, Gloo on CPU — unless the caller already did. Without those variables it is a
single-process context and every helper is a no-op. Nothing global is touched otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DistContext"]


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, use_cuda: bool) -> DistContext:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        owns = False
        if not dist.is_initialized():
            backend = "nccl" if use_cuda else "gloo"
            if use_cuda:
                torch.cuda.set_device(local)
            dist.init_process_group(backend=backend)
            owns = True
        return cls(dist.get_rank(), dist.get_world_size(), local, owns)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_gather_objects(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sync_buffers(self, module: torch.nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

        DDP broadcasts buffers at the start of each forward, so after the last step each rank
        still holds the statistics of its own last batch; this makes them identical again.
        """
        if not self.enabled:
            return
        for buf in module.buffers():
            dist.broadcast(buf.data, src=0)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
