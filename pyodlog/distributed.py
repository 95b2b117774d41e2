"""Coordination of loggers across ``torch.distributed`` ranks.

pyodlog rides on PyTorch's own runtime (a job launched with ``torchrun``):
every rank writes its own segments (its rank is in the file names and
attributes) and nothing is shared between the ranks' writers. Only two
things are collective, and both go over a gloo group of pyodlog's own (so a
NCCL job needs no device tensors for them, and every wait has a timeout):

* construction: rank 0 resolves ``result_name`` and ``n_epoch='latest'`` and
  broadcasts them, so every rank logs into the same result and epoch;
* ``export()``: every rank saves and closes its segment, a monitored barrier
  (which names a rank that does not arrive) lets rank 0 continue, and rank 0
  checks that it sees every rank's segments before it writes one ZIP.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["DistContext", "DistributedLoggingError", "current_context"]

#: How long the collective steps of construction may wait for the slowest rank.
CONSTRUCTION_TIMEOUT = datetime.timedelta(minutes=30)


class DistributedLoggingError(RuntimeError):
    """A collective step of pyodlog failed: a rank did not arrive, or ranks do not share the data folder."""


@dataclass
class DistContext:
    """This process's place in an initialised process group of more than one rank."""

    rank: int
    world_size: int
    group: Any  # a gloo process group (or None: the default group, when it is gloo)

    def broadcast_from_rank0(self, value: Any) -> Any:
        """Rank 0's ``value``, on every rank."""
        import torch.distributed as dist

        box = [value if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def barrier(self, timeout: float, what: str) -> None:
        """Waits for every rank, at most ``timeout`` seconds; the error names who did not arrive."""
        import torch.distributed as dist

        try:
            dist.monitored_barrier(
                group=self.group, timeout=datetime.timedelta(seconds=timeout), wait_all_ranks=True
            )
        except RuntimeError as error:
            raise DistributedLoggingError(
                f"pyodlog {what}: not every rank arrived within {timeout:.0f} s ({error}). Every rank must call "
                f"{what} (it is collective); a rank that died leaves its saved segments in the result folder "
                "(the next logger recovers its open one)"
            ) from error

    def gather_to_rank0(self, value: Any) -> list[Any] | None:
        """Every rank's ``value`` on rank 0 (a list by rank); None elsewhere."""
        import torch.distributed as dist

        out = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(value, out, dst=0, group=self.group)
        return out


def current_context() -> DistContext | None:
    """The distributed context when a process group of more than one rank is initialised, else None.

    Collective: every rank must call it (it creates pyodlog's gloo group when
    the job's backend is not gloo).
    """
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return None
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    group = (
        None
        if dist.get_backend() == "gloo"
        else dist.new_group(backend="gloo", timeout=CONSTRUCTION_TIMEOUT)
    )
    return DistContext(dist.get_rank(), dist.get_world_size(), group)


def agree(context: DistContext | None, decide: Callable[[], Any]) -> Any:
    """Runs ``decide`` on rank 0 and returns its result on every rank.

    An exception on rank 0 is raised on rank 0 and reported on the others
    (which would otherwise wait for a broadcast that never comes).
    """
    if context is None:
        return decide()
    if context.rank == 0:
        try:
            value = decide()
        except BaseException as error:
            context.broadcast_from_rank0(("error", f"{type(error).__name__}: {error}"))
            raise
        context.broadcast_from_rank0(("ok", value))
        return value
    status, value = context.broadcast_from_rank0(None)
    if status == "error":
        raise DistributedLoggingError(f"rank 0 could not open the result, so no rank logs: {value}")
    return value
