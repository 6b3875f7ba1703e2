"""Exporting a verified step's model weights as one file that other tools open: safetensors (for
inference servers and a Hugging Face upload), a ``torch.save`` state dict, or a Lightning
``.ckpt``.

The step is read through the store like a restore (every byte against its digest, decoded under
bounds) and consolidated in this process alone: replicated tensors from the shared files,
sharded (FSDP2/DCP) tensors assembled to their full shape from every rank's shard by DCP's own
planner, without a process group. The output is written beside its final name and linked into
place, so it appears whole or not at all and never replaces a file.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import os
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CheckpointCorruptError, ConfigError, NoCheckpointError
from ..storage.protocol import Storage
from .format import as_cpu_contiguous, safetensors_file, unflatten
from .layout import FileKind, step_dir
from .manifest import Manifest
from .store import CheckpointStore
from .values import DecodeRules, plain

FORMATS = ("safetensors", "torch", "lightning")
_SUFFIXES = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch", ".bin": "torch", ".ckpt": "lightning"}
#: ``--dtype`` spellings: floating-point weights are cast, integer and bool tensors kept.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: Where the model's weights sit in a plain CheckpointManager state, tried in order.
MODEL_KEYS = ("model", "state_dict", "module", "net")
_LIGHTNING_STATE = "checkpoint"  # a Lightning bundle stores {"checkpoint": <Lightning's dict>}


def format_for(out: str, fmt: str | None) -> str:
    """The output format: ``fmt`` when given, else from OUT's suffix."""
    if fmt is not None:
        return fmt
    suffix = os.path.splitext(out)[1].lower()
    if suffix not in _SUFFIXES:
        raise ConfigError(f"export: cannot tell the format from {out!r}; give --format "
                          f"({'|'.join(FORMATS)}) or name it *.safetensors, *.pt or *.ckpt")
    return _SUFFIXES[suffix]


def consolidated_state(store: CheckpointStore, manifest: Manifest) -> Any:
    """The step's replicated state as one tree, sharded leaves loaded at their full shape.
    Raises CheckpointCorruptError naming the file when a byte does not verify."""
    skeleton, tensors = store.read_replicated(manifest)
    full: dict[str, torch.Tensor] = {}
    if manifest.files_of(FileKind.DCP_META):
        import torch.distributed.checkpoint as dcp

        from .._torch_compat import dcp_exception
        from .sharded import StoreReader

        reader = StoreReader(store, manifest)
        meta = reader.read_metadata()
        full = {fqn: torch.empty(md.size, dtype=md.properties.dtype)  # type: ignore[union-attr]
                for fqn, md in meta.state_dict_metadata.items()}
        try:
            dcp.load(full, storage_reader=reader, no_dist=True)
        except dcp_exception() as e:  # DCP wraps what our reader raised: say that, naming the file
            causes = [f[0] if isinstance(f, tuple) else f for f in getattr(e, "failures", {}).values()]
            cause = next((c for c in causes if isinstance(c, CheckpointCorruptError)), None)
            if cause is not None:
                raise cause from None
            raise CheckpointCorruptError(manifest.step, None, f"sharded state could not be loaded: {e}") from None
    return unflatten(skeleton, tensors, where=store.storage.display(step_dir(manifest.step)), sharded=full,
                     rules=store.decode_rules())


def exported_step(store: CheckpointStore, step: int | None) -> tuple[Manifest, Any]:
    """The step to export and its consolidated state: ``step``, or the newest committed step
    that reads whole (damaged ones on the way are skipped; when none reads, the error names
    each reason). Reading is the verification: every byte exported passed its digest and a
    bounded decode, and nothing is read twice."""
    where = store.storage.display()
    committed = store.committed_steps()
    if step is not None:
        if step not in committed:
            if step in store.step_dirs():
                raise CheckpointCorruptError(step, where, "never committed")
            raise NoCheckpointError(f"step {step} does not exist under {where}")
        manifest = store.read_manifest(step)
        return manifest, consolidated_state(store, manifest)
    problems = []
    for candidate in committed:
        try:
            manifest = store.read_manifest(candidate)
            return manifest, consolidated_state(store, manifest)
        except CheckpointCorruptError as e:
            problems.append(f"step {candidate}: {e.file}: {e.reason}")
    raise NoCheckpointError(f"no loadable checkpoint under {where}" + (f" ({'; '.join(problems)})" if problems else ""))


@dataclass
class Exported:
    """What :func:`export` wrote."""

    step: int
    key: str
    tensors: int
    size: int
    note: str


def export(store: CheckpointStore, out: str, *, fmt: str, step: int | None = None, dtype: str | None = None,
           key: str | None = None, progress: Callable[[int, int], None] | None = None) -> Exported:
    """Write the model weights of ``step`` (default: the newest loadable) to the new file ``out``
    in ``fmt`` (:data:`FORMATS`); ``dtype`` a key of :data:`DTYPES`; ``progress(done, total)``
    in bytes while writing."""
    manifest, state = exported_step(store, step)
    lightning = None
    if isinstance(state, dict) and manifest.metadata.get("lightning_path") is not None and isinstance(
            state.get(_LIGHTNING_STATE), dict):
        lightning = state[_LIGHTNING_STATE]
    return export_state(lightning if lightning is not None else state, out, step=manifest.step,
                        epoch=manifest.metadata.get("epoch"), lightning=lightning is not None, fmt=fmt, dtype=dtype,
                        key=key, progress=progress)


def export_file(storage: Storage, name: str, out: str, *, fmt: str, dtype: str | None = None, key: str | None = None,
                progress: Callable[[int, int], None] | None = None) -> Exported:
    """:func:`export` for a single-file Lightning checkpoint (verified against its record)."""
    from .single_file import load_verified

    checkpoint, record = load_verified(storage, name, DecodeRules())
    step = record.step if record is not None else checkpoint.get("global_step")
    return export_state(checkpoint, out, step=step if isinstance(step, int) else 0, epoch=checkpoint.get("epoch"),
                        lightning=True, fmt=fmt, dtype=dtype, key=key, progress=progress)


def export_state(state: Any, out: str, *, step: int, epoch: Any, lightning: bool, fmt: str, dtype: str | None,
                 key: str | None, progress: Callable[[int, int], None] | None) -> Exported:
    """Write the weights in ``state`` (a Lightning checkpoint dict when ``lightning``)."""
    weights = find_weights(state, step, key, lightning=lightning)
    tensors = cast(weights.tensors, DTYPES[dtype] if dtype else None)
    if fmt == "safetensors":
        named = [(n, as_cpu_contiguous(t.detach())) for n, t in tensors.items()]
        encoded = safetensors_file(named, {"format": "pt", "elastic_resume_step": str(step)})
        size, chunks, note = encoded.size, encoded.chunks(), "safetensors"
    else:
        data = weights_only_bytes(lightning_checkpoint(weights, tensors, step, epoch) if fmt == "lightning" else tensors)
        size, chunks = len(data), iter([memoryview(data)])
        note = ("Lightning .ckpt" if fmt == "lightning" else "torch state dict") + ", loads with weights_only=True"
    write_new_file(out, chunks, size=size, progress=progress)
    return Exported(step, weights.key, len(tensors), size, note + (f", {dtype}" if dtype else ""))


@dataclass
class Weights:
    """The model weights found in a step: where they were and the flat name -> tensor dict."""

    key: str
    tensors: dict[str, torch.Tensor]
    #: The Lightning checkpoint dict when the step is a Lightning bundle's (the rest of it).
    lightning: dict[str, Any] | None = None


def _flat(tree: Any, prefix: str, out: dict[str, torch.Tensor], key: str) -> None:
    if isinstance(tree, torch.Tensor):
        out[prefix] = tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            _flat(v, f"{prefix}.{k}" if prefix else str(k), out, key)
    else:
        raise ConfigError(f"export: {key!r} holds {type(tree).__name__} at {prefix or 'its top'!r}, not model "
                          "weights; pick the entry with the model's state dict with --key")


def find_weights(state: Any, step: int, key: str | None, *, lightning: bool = False) -> Weights:
    """The model's state dict in a step: Lightning's ``state_dict`` when ``state`` is a Lightning
    checkpoint, else ``key`` (default: the first of :data:`MODEL_KEYS` present). DDP's
    ``module.`` prefix is dropped."""
    if lightning:
        key = key or "state_dict"
    if not isinstance(state, dict):
        raise CheckpointCorruptError(step, None, "the state is not a dict of names")
    if key is None:
        key = next((k for k in MODEL_KEYS if k in state), None)
        if key is None:
            raise ConfigError(f"export: step {step} has no entry named {', '.join(MODEL_KEYS)}; it holds "
                              f"{', '.join(map(repr, list(state)[:12]))}; pick the model's with --key")
    if key not in state:
        raise ConfigError(f"export: --key {key!r}: step {step} has no such entry; it holds "
                          f"{', '.join(map(repr, list(state)[:12]))}")
    flat: dict[str, torch.Tensor] = {}
    _flat(state[key], key if isinstance(state[key], torch.Tensor) else "", flat, key)
    if not flat:
        raise ConfigError(f"export: {key!r} of step {step} holds no tensors")
    if not lightning and all(name.startswith("module.") for name in flat):  # saved from a DDP wrapper
        flat = {name.removeprefix("module."): t for name, t in flat.items()}
    return Weights(key, flat, state if lightning else None)


def cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Floating-point tensors in ``dtype``; integer, bool and complex ones as they are."""
    if dtype is None:
        return tensors
    return {n: t.to(dtype) if t.is_floating_point() else t for n, t in tensors.items()}


def write_new_file(out: str, chunks: Iterable[memoryview | bytes], *, size: int,
                   progress: Callable[[int, int], None] | None = None) -> None:
    """Write the ``size`` bytes of ``chunks`` to ``out`` whole or not at all, never over an
    existing file: into a temporary name beside it, synced, then hard-linked into place
    (create-only). Mode 0666 less the umask, as any file a tool writes: an export is for other
    tools and people."""
    tmp = os.path.join(os.path.dirname(out), f".export-{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    written = 0
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                written += len(chunk)
                if progress is not None:
                    progress(written, size)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, out)  # create-only: a file that appeared meanwhile is not replaced
        except FileExistsError:
            raise ConfigError(f"{out} appeared while exporting; export never replaces a file") from None
    finally:
        os.unlink(tmp)


def to_bytes(obj: Any) -> bytes:
    """What ``torch.save(obj)`` writes."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def weights_only_bytes(obj: Any) -> bytes:
    """``torch.save`` bytes of ``obj`` with every config value in plain form (``values.plain``),
    proven to load with ``torch.load(weights_only=True)``: our decoder yields tensors and plain
    containers only, so every step passes; an export proves it before writing."""
    data = to_bytes(plain(obj))
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - the weights-only unpickler's refusal, as one line
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        why = next((line for line in lines if "Unsupported global" in line), lines[0] if lines else type(e).__name__)
        raise ConfigError(f"checkpoint does not load with weights_only=True: {why[:300]}") from None
    return data


def lightning_checkpoint(weights: Weights, tensors: dict[str, torch.Tensor], step: int, epoch: Any) -> dict[str, Any]:
    """A Lightning ``.ckpt`` dict: a bundle's own (its ``state_dict`` cast), or for a plain
    step what ``LightningModule.load_from_checkpoint`` needs."""
    if weights.lightning is not None:
        return dict(weights.lightning, state_dict=tensors)
    checkpoint: dict[str, Any] = {"state_dict": tensors, "global_step": step, "epoch": epoch or 0}
    for dist in ("lightning", "pytorch-lightning"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            checkpoint["pytorch-lightning_version"] = importlib.metadata.version(dist)
            break
    return checkpoint
