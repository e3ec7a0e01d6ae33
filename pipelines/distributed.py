"""Who this process is in a ``torchrun`` launch, and the few collectives extraction needs.

``torchrun`` sets WORLD_SIZE, RANK and LOCAL_RANK; without them (or with one
process) :func:`join` returns a group of one whose collectives do nothing.
Extraction only exchanges small Python objects (an error, image counts), so
the group always uses the gloo back-end, on CPU and GPU machines alike and
across nodes.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

import numpy as np
import torch

logger = logging.getLogger(__name__)
T = TypeVar("T")
# How long a rank waits in a collective for the others: they may be checking a large store's
# checksums or finishing a larger share of images (gloo's default is 30 minutes).
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=12)


@dataclass
class Group:
    """This process's place among ``world`` processes; rank 0 is the leader."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_process_group: bool = False

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def share(self, indices, chunk_images: int = 1):
        """This process's share of ``indices`` (sorted image indices): whole chunks of ``chunk_images``
        images, dealt out in turn, so that no two processes ever write the same chunk of the store."""
        indices = np.asarray(indices, dtype=np.int64)
        chunks = indices // max(1, int(chunk_images))
        mine = np.unique(chunks)[self.rank :: self.world]
        return indices[np.isin(chunks, mine)]

    def _broadcast(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def leader_runs(self, fn: Callable[[], T]) -> Optional[T]:
        """Run ``fn`` on rank 0 only, then wait for it everywhere.

        Rank 0 gets ``fn``'s result, the others None; if ``fn`` raised, every rank raises it,
        so no process waits forever for a leader that stopped.
        """
        result, error = None, None
        if self.leader:
            try:
                result = fn()
            except Exception as exc:  # shared with the other ranks below, then raised here too
                error = exc
        error = self._broadcast(error)
        if error is not None:
            raise error
        return result

    def from_leader(self, fn: Callable[[], T]) -> T:
        """``fn()`` run on rank 0, its result given to every rank (so that all decide alike)."""
        return self._broadcast(self.leader_runs(fn))

    def union(self, items: list[int]) -> list[int]:
        """The sorted union of every rank's ``items`` (every rank gets it)."""
        if self.world == 1:
            return sorted(set(items))
        gathered: list = [None] * self.world
        torch.distributed.all_gather_object(gathered, list(items))
        return sorted({i for part in gathered for i in part})

    def sum(self, values: list[int]) -> list[int]:
        """Element-wise sum over all ranks (every rank gets the totals); also a barrier."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.int64)
        torch.distributed.all_reduce(t)
        return [int(v) for v in t.tolist()]

    def close(self) -> None:
        if self.owns_process_group:
            torch.distributed.destroy_process_group()
            self.owns_process_group = False


def join() -> Group:
    """The group this process was launched in (torchrun's environment variables), or a group of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Group()
    import torch.distributed as dist

    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
        owns = True
    group = Group(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)
    logger.info("rank %d of %d (local rank %d)", group.rank, group.world, group.local_rank)
    return group


def rank_device(device: torch.device, group: Group) -> torch.device:
    """One GPU per process: ``cuda`` becomes ``cuda:LOCAL_RANK`` when several processes share a node."""
    if device.type != "cuda" or group.world == 1 or device.index is not None:
        return device
    torch.cuda.set_device(group.local_rank)
    return torch.device("cuda", group.local_rank)
