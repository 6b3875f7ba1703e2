"""Reading a step: what one rank needs of it, every byte verified as it arrives, decoded under
bounds, nothing loaded into live objects yet. The one reader behind ``CheckpointManager.restore``
and ``ElasticCheckpointIO.load_checkpoint``; which step every rank then loads is decided in
``agreement.py``.

A rank reads the shared files (the replicated state and its structure) and its own per-rank
file. After a world-size change there is no per-rank file for new ranks: per-rank values that
can be resharded (``RNGState``, the detectors) are then rebuilt from saved rank 0's, and any
other per-rank value makes the restore fail, naming it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ..errors import CheckpointCorruptError, StateError, StorageError
from .format import unflatten
from .layout import FileKind, step_dir
from .manifest import Manifest, manifest_hash
from .memory_tier import read_held_or_stored
from .values import DecodeRules
from .verified_reader import StepReader

if TYPE_CHECKING:
    from .parallel_read import ParallelRead

V = TypeVar("V")


@dataclass
class LoadedStep:
    """One rank's verified share of a committed step."""

    manifest: Manifest
    #: The replicated state as a tree; None while sharded (DTensor) leaves still have to be
    #: loaded, collectively, into the live state (:meth:`finish_sharded`).
    replicated: dict[str, Any] | None
    #: This rank's per-rank values (None when the step holds none).
    per_rank: dict[str, Any] | None = None
    #: True after a world-size change: ``per_rank`` holds saved rank 0's values, to reshard
    #: from, not to load as they are.
    reseed: bool = False
    skeleton: Any = None
    tensors: list[Any] | None = None
    rules: DecodeRules | None = None
    #: Where the bytes came from: ``memory`` (the memory tier, no storage read) or ``storage``.
    tier: str = "storage"

    @property
    def step(self) -> int:
        return self.manifest.step

    @property
    def has_sharded(self) -> bool:
        return bool(self.manifest.files_of(FileKind.DCP_META))

    def finish_sharded(self, sharded: dict[str, Any]) -> None:
        """Build the replicated tree once the sharded leaves are loaded (``sharded``: by path)."""
        self.replicated = _as_state(unflatten(self.skeleton, self.tensors or [], where=step_dir(self.step),
                                              sharded=sharded, rules=self.rules), self.step, "the replicated state")


@dataclass
class ReadAttempt(Generic[V]):
    """What one rank made of one candidate: a value, or the file and reason it failed."""

    value: V | None
    #: :func:`manifest_hash` of the manifest read (ranks compare it: same commit everywhere).
    manifest_hash: int = 0
    file: str | None = None
    why: str | None = None
    #: Raw digest of the manifest this rank judged (valid or not): the proof a later
    #: replacement of this step compares against.
    seen_digest: str | None = None


def _as_state(tree: Any, step: int, what: str) -> dict[str, Any]:
    if not isinstance(tree, dict):
        raise CheckpointCorruptError(step, None, f"{what} is not a dict of names")
    return tree


def read_step(store: StepReader, manifest: Manifest, *, rank: int, world_size: int,
              state: Mapping[str, Any], parallel: ParallelRead | None = None) -> LoadedStep:
    """This rank's share of the step ``manifest`` commits. ``state`` is the live state it will be
    loaded into (its per-rank values say whether they can be resharded). ``parallel``: the
    replicated files are spread over the ranks and exchanged (collective), instead of every
    rank reading every one. Raises CheckpointCorruptError naming the file, StateError when the
    state cannot take it."""
    step = manifest.step
    source, reseed = rank, False
    keys = manifest.extra.get("per_rank_keys", [])
    if manifest.world_size != world_size and keys:
        stuck = [k for k in keys if k in state and not getattr(state[k], "reshardable", False)]
        if stuck:
            raise StateError(
                f"checkpoint step {step} was saved at world size {manifest.world_size} and is restored at "
                f"world size {world_size}, but per-rank state {', '.join(map(repr, stuck))} cannot be "
                f"resharded; restore at world size {manifest.world_size}, or drop it from the state"
            )
        source, reseed = 0, True
    if parallel is not None:
        skeleton, tensors, tier = parallel.read(store, manifest)
    else:
        (skeleton, tensors), tier = store.read_replicated(manifest), "storage"
    loaded = LoadedStep(manifest, replicated=None, reseed=reseed, rules=store.decode_rules(), tier=tier)
    if loaded.has_sharded:
        # Sharded tensors are loaded after every rank agreed on this step (DCP's load is
        # collective); until then the structure stays a skeleton.
        loaded.skeleton, loaded.tensors = skeleton, tensors
    else:
        loaded.replicated = _as_state(unflatten(skeleton, tensors, where=step_dir(step), rules=loaded.rules), step,
                                      "the replicated state")
    memory = parallel.memory if parallel is not None and source == rank else None
    if memory is not None and (entry := store.per_rank_entry(manifest, rank)) is not None:
        buffer, held = read_held_or_stored(memory, store, manifest, entry)
        loaded.tier = loaded.tier if held else "storage"
        per_rank = store.per_rank_tree(manifest, entry, store.decode_part(manifest, entry, buffer))
    else:
        per_rank = store.read_per_rank(manifest, source)
    if per_rank is not None:
        loaded.per_rank = _as_state(per_rank, step, f"the per-rank state of rank {source}")
    return loaded


def try_read(store: StepReader, step: int, *, rank: int, world_size: int,
             state: Mapping[str, Any], parallel: ParallelRead | None = None) -> ReadAttempt[LoadedStep]:
    """:func:`read_step` of ``step`` as an attempt: corruption and unreadable files become the
    attempt's reason (restore moves on to an older step); a state that cannot take the step
    (StateError) is raised, since no older step would fit it better."""
    try:
        manifest = store.read_manifest(step)
    except CheckpointCorruptError as e:
        if parallel is not None:
            parallel.absent()
        return ReadAttempt(None, file=e.file, why=e.reason, seen_digest=store.manifest_digest(step))
    try:
        loaded = read_step(store, manifest, rank=rank, world_size=world_size, state=state, parallel=parallel)
    except StateError:
        raise
    except CheckpointCorruptError as e:
        return ReadAttempt(None, file=e.file, why=e.reason, seen_digest=manifest.raw_digest)
    except (StorageError, OSError) as e:
        return ReadAttempt(None, why=f"unreadable: {e}", seen_digest=manifest.raw_digest)
    return ReadAttempt(loaded, manifest_hash(manifest), seen_digest=manifest.raw_digest)
