"""Silent replica divergence: digests of the parameters every rank holds a copy of.

Under DDP every rank holds bitwise-identical parameters after each optimizer step (gradients are
averaged, so the same update lands everywhere). A chip that computes a wrong number, a bit flip in
memory, or a write by one rank alone breaks that, and nothing in the loss shows it: the averaged
gradient keeps the other parameters identical, and the bad element simply stays wrong.

A digest here is the wrapping int64 sum of each tensor's bytes read as 64-bit words, mixed over
the tensors by position, kept to 52 bits so that it travels exactly in a float64 vote field. Any change
of one element changes it; it costs one read of the tensors and no copy, and on CUDA it stays on the
device (the vote carries the device tensor; nothing waits for it). It is a detector, not a
cryptographic hash: two errors that cancel exactly, or two elements swapped, go unseen.

Which parameters are replicas: those of the ``torch.nn.Module`` values at the top of the training
state. A value wrapped in ``PerRank`` is not a module, so it is left out, and so are sharded
parameters (DTensor, FSDP), which differ per rank by design; buffers are left out too (DDP's
BatchNorm statistics are updated locally by each rank's forward).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

#: Digests keep 52 bits: exact in a float64 (the vote's dtype).
BITS = 52
MASK = (1 << BITS) - 1
_AS_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _is_sharded(p: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(p, DTensor)


def _is_fsdp(module: torch.nn.Module) -> bool:
    # FSDP1's wrapper and FSDP2's fully_shard classes (FSDP<Name>) hold shards, not replicas.
    return any(type(m).__name__ == "FullyShardedDataParallel" or type(m).__name__.startswith("FSDP")
               for m in module.modules())


def replicated_parameters(state: Mapping[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every parameter the ranks hold identical copies of, in a fixed order
    (the same on every rank of a job whose ranks built the same models)."""
    found: list[tuple[str, torch.Tensor]] = []
    for key in sorted(state, key=str):
        module = state[key]
        if not isinstance(module, torch.nn.Module) or _is_fsdp(module):
            continue
        for name, p in module.named_parameters():
            if not _is_sharded(p) and p.numel():
                found.append((f"{key}.{name}", p.detach()))
    return found


def tensor_digests(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One wrapping int64 digest per tensor (a 1-D int64 tensor on the first tensor's device)."""
    if not tensors:
        return torch.zeros(0, dtype=torch.int64)
    return torch.stack([_bits_sum(t).to(tensors[0].device) for t in tensors])


def _bits_sum(t: torch.Tensor) -> torch.Tensor:
    """The wrapping int64 sum of ``t``'s bytes read as 64-bit words (the few elements past the
    last whole word added as integers of their own width): bitwise-equal tensors give equal
    sums on every rank, and any one changed bit changes it. Words, not elements: an int64 sum
    of 64-bit words runs at memory speed, where widening each 32-bit element costs 20 times that."""
    flat = (torch.view_as_real(t) if t.is_complex() else t).reshape(-1)
    size = flat.element_size()
    whole = flat.numel() - flat.numel() % (8 // size)
    try:
        total = flat[:whole].view(torch.int64).sum() if whole else torch.zeros((), dtype=torch.int64)
    except RuntimeError:  # a view that does not start on a word boundary: a copy does
        total = flat[:whole].clone().view(torch.int64).sum()
    if whole < flat.numel():
        total = total + flat[whole:].view(_AS_INT[size]).sum(dtype=torch.int64)
    return total


def combine(digests: torch.Tensor) -> torch.Tensor:
    """The tensors' digests mixed by position into one 52-bit value (a 0-dim int64 tensor): a
    change moved from one tensor to another changes it."""
    weights = torch.arange(1, 2 * len(digests) + 1, 2, dtype=torch.int64, device=digests.device)
    return (digests * weights).sum() & MASK


def digest(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The 52-bit digest of ``tensors`` (0-dim int64, on their device; 0 for none)."""
    return combine(tensor_digests(tensors)) if tensors else torch.zeros((), dtype=torch.int64)


@dataclass(frozen=True)
class Digests:
    """One rank's per-parameter digests, as plain ints (they travel between ranks)."""

    names: tuple[str, ...]
    values: tuple[int, ...]


def state_digests(state: Mapping[str, Any]) -> Digests:
    """Every replicated parameter of ``state`` and its digest (what a save's agreement compares)."""
    found = replicated_parameters(state)
    values = tensor_digests([p for _, p in found]).tolist() if found else []
    return Digests(tuple(n for n, _ in found), tuple(int(v) for v in values))


class Rotation:
    """Which parameters the next check digests: the replicated parameters split into ``slices``
    of about equal bytes, taken in turn, so a check reads 1/slices of the model and every
    parameter is read once every ``slices`` checks."""

    def __init__(self, parameters: Sequence[tuple[str, torch.Tensor]], slices: int) -> None:
        self.parameters = list(parameters)
        total = sum(p.numel() * p.element_size() for _, p in self.parameters)
        self.slices: list[list[int]] = [[] for _ in range(max(1, min(slices, len(self.parameters))))]
        done = 0
        for i, (_, p) in enumerate(self.parameters):
            # Each tensor goes to the slice its middle byte falls in: contiguous, about equal.
            size = p.numel() * p.element_size()
            index = min(len(self.slices) - 1, (done + size // 2) * len(self.slices) // max(1, total))
            self.slices[index].append(i)
            done += size
        self.slices = [s for s in self.slices if s] or [[]]
        self.turn = 0

    def next(self) -> Sample:
        """The next slice's digest (taken now, from the live tensors)."""
        indices = self.slices[self.turn % len(self.slices)]
        self.turn += 1
        tensors = [self.parameters[i][1] for i in indices]
        per_tensor = tensor_digests(tensors)
        return Sample(indices=tuple(indices), per_tensor=per_tensor, value=combine(per_tensor) if indices else
                      torch.zeros((), dtype=torch.int64))

    def names(self, indices: Iterable[int]) -> list[str]:
        return [self.parameters[i][0] for i in indices]


@dataclass(frozen=True)
class Sample:
    """What one check digested: which parameters (indices into the rotation), each one's digest,
    and their combined 52-bit digest (the vote field)."""

    indices: tuple[int, ...]
    per_tensor: torch.Tensor
    value: torch.Tensor


def odd_ranks(digests: Sequence[Any]) -> list[int]:
    """The ranks whose digest is not the majority's. With no strict majority (two ranks that
    disagree, or three different values) no rank can be told apart: every rank is named."""
    counts = Counter(digests)
    if len(counts) <= 1:
        return []
    (common, n), = counts.most_common(1)
    if n * 2 <= len(digests):
        return list(range(len(digests)))
    return [r for r, d in enumerate(digests) if d != common]


#: At most this many differing parameters are named (a divergence that spread names them all).
MAX_NAMED = 8


@dataclass(frozen=True)
class Disagreement:
    """Replicas that differ: the odd ranks and the parameters whose digests differ."""

    ranks: list[int]
    parameters: list[str]
    differing: int  #: how many parameters differ (``parameters`` names the first MAX_NAMED)

    def describe(self, world_size: int) -> str:
        who = ("every rank differs from the others" if len(self.ranks) == world_size else
               f"rank{'s' if len(self.ranks) > 1 else ''} {', '.join(map(str, self.ranks))} "
               f"differ{'s' if len(self.ranks) == 1 else ''} from the other {world_size - len(self.ranks)}")
        more = f" and {self.differing - len(self.parameters)} more" if self.differing > len(self.parameters) else ""
        return f"{who}, in {', '.join(self.parameters)}{more}"

    def event_fields(self, step: int, world_size: int, found_by: str) -> dict[str, Any]:
        """The ``replica_divergence`` event's fields: the same whether the vote or a save found it."""
        when = "at the save of" if found_by == "save" else "after"
        return {"step": step, "ranks": self.ranks, "parameters": self.parameters, "differing": self.differing,
                "found_by": found_by,
                "reason": f"the replicated parameters differ between ranks {when} step {step}: "
                          f"{self.describe(world_size)}"}

    def refusal(self, step: int, world_size: int) -> str:
        """Why a checkpoint of ``step`` is not committed."""
        return (f"checkpoint step {step} was not committed: the ranks' copies of the replicated parameters "
                f"differ ({self.describe(world_size)}); no copy can be told good")


def disagreement(per_rank: Sequence[Sequence[int]], names: Sequence[str]) -> Disagreement | None:
    """Compare every rank's per-parameter digests (``per_rank[r]``, in ``names`` order); None
    when every rank holds the same."""
    rows = [tuple(r) for r in per_rank]
    ranks = odd_ranks(rows)
    if not ranks:
        return None
    differing = [names[i] if i < len(names) else f"#{i}" for i in range(max(map(len, rows)))
                 if len({r[i] if i < len(r) else None for r in rows}) > 1]
    return Disagreement(ranks, differing[:MAX_NAMED], len(differing))
