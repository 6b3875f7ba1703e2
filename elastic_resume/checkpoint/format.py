"""The checkpoint data-file format: a safetensors file whose metadata carries the state's tree.

Why not ``torch.save``: a pickle can execute code when loaded, and ``torch.save`` writes through
a zip writer that computes its own CRC and copies each tensor; both cost time we measure against.
This format cannot run code by construction (the only parsers are ``json.loads`` and
bounds-checked offsets), lets the storage layer stream tensor memory straight to the file with
no intermediate copy, and reads each tensor straight into storage of its own.

Every data file is a valid `safetensors <https://github.com/huggingface/safetensors>`_ file, so
``safetensors.safe_open`` and the Hugging Face tools open it without this library::

    u64 little-endian              length N of the JSON header
    JSON header (N bytes)          {"__metadata__": {"format": "pt", "elastic_resume": "<tree JSON>"},
                                    "<name>": {"dtype": "F32", "shape": [..], "data_offsets": [b, e]}, ...}
                                   padded with spaces so the data starts 64-byte aligned
    tensor bytes                   back to back, no holes: those whose size is a multiple of 64
                                   first (64-aligned), then the rest largest element size first
                                   (each aligned to its own element size)

The tree (metadata ``elastic_resume``: ``{"version": 2, "tree": ..., "tensors": [names], "complex":
[indices]}``) encodes dicts as key/value pairs (so int keys and key order survive, as optimizer
state needs), tuples, bytes, dtypes and devices with small tags; tensors are references
``{"t": index}`` into the ``tensors`` list of names. Complex tensors are stored as their real
view (safetensors has no complex128). Ordinary Python values of configs (paths, enums, sets,
dataclasses, datetimes, namespaces, OmegaConf containers) have tags of their own (``values.py``).

Files written before 0.6 (``.ert``: magic ``ERCKPT``, a JSON header, 64-byte aligned tensors)
stay readable: both framings decode into the same tree.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeGuard

import torch

from ..errors import CheckpointCorruptError, StateError, UnsafeCheckpointError
from ..storage import tensor_bytes
from .values import DecodeRules, decode_value, encode_value

#: Magic bytes of the format written before 0.6 (still read).
MAGIC = b"ERCKPT\x00\x01"
ALIGN = 64
#: The ``__metadata__`` key holding the tree (JSON text: safetensors metadata values are strings).
META_KEY = "elastic_resume"
FORMAT_VERSION = 2
_LEN = struct.Struct("<Q")
_HEADER_LIMIT = 1 << 31  # a header larger than 2 GiB is certainly corrupt
#: How deep a saved tree may nest. Saving refuses deeper states, so a deeper header on disk is
#: damage or a hostile file; the bound also keeps decoding far from Python's recursion limit.
MAX_TREE_DEPTH = 200
_MAX_DIMS = 64  # torch supports at most 64 dimensions
_MAX_DIM_SIZE = 1 << 62
# Failures a hostile but digest-valid header can provoke inside decoding; each one becomes a
# CheckpointCorruptError naming the file (a safety net under the explicit checks below).
_DECODE_FAILURES = (TypeError, ValueError, OverflowError, RecursionError, binascii.Error, RuntimeError,
                    AttributeError, KeyError, IndexError, MemoryError)

# Only plain numeric dtypes; anything exotic (quantized, sparse) is refused at save time.
DTYPES: dict[str, torch.dtype] = {
    str(dt).removeprefix("torch."): dt
    for dt in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16,
        torch.complex64, torch.complex128,
        torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
        torch.uint16, torch.uint32, torch.uint64,
        torch.float8_e4m3fn, torch.float8_e5m2,
    )
}

#: safetensors' names of the dtypes stored as they are (complex tensors go as their real view).
ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_FROM_ST = {name: dt for dt, name in ST_DTYPES.items()}

_ITEMSIZE: dict[torch.dtype, int] = {dt: torch.empty((), dtype=dt).element_size() for dt in DTYPES.values()}

_PICKLE_HINTS = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class Payload(Protocol):
    """Bytes to write as one data file: their size up front, then the bytes in chunks."""

    size: int

    def chunks(self) -> Iterator[memoryview]: ...


@dataclass
class EncodedFile:
    """A tree ready to stream out: header bytes plus tensors, with the total size known up front
    (so a reader can allocate once and a multipart upload can plan its parts)."""

    header: bytes
    tensors: list[torch.Tensor] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    size: int = 0

    def chunks(self) -> Iterator[memoryview]:
        yield memoryview(self.header)
        pos = 0
        for t, off in zip(self.tensors, self.offsets):
            if off > pos:
                yield memoryview(bytes(off - pos))
            view = tensor_bytes(t)
            if len(view):
                yield view
            pos = off + len(view)
        if self.size - len(self.header) > pos:
            yield memoryview(bytes(self.size - len(self.header) - pos))


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor" and type(t).__module__.startswith("torch.distributed")


class _Encoder:
    def __init__(self, *, to_cpu: bool = True, sharded: dict[str, torch.Tensor] | None = None) -> None:
        self.tensors: list[torch.Tensor] = []
        self.paths: list[str] = []  # where each tensor sits in the tree (its name in the file)
        self.ids: list[int] = []  # id() of each tensor as given (for names the caller chose)
        self.to_cpu = to_cpu
        self.sharded = sharded  # when given, DTensors are collected here instead of refused

    def tensor(self, t: torch.Tensor, path: str) -> int:
        if t.is_sparse or t.is_quantized or t.layout != torch.strided:
            raise StateError(f"{path}: tensors with layout {t.layout} cannot be checkpointed")
        if type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
            raise StateError(
                f"{path}: tensor subclass {type(t).__name__} cannot be saved here "
                "(sharded DTensor state goes through the distributed manager)"
            )
        if str(t.dtype).removeprefix("torch.") not in DTYPES:
            raise StateError(f"{path}: dtype {t.dtype} is not supported in checkpoints")
        self.ids.append(id(t))
        t = t.detach()
        if self.to_cpu:
            t = as_cpu_contiguous(t)
        self.tensors.append(t)
        self.paths.append(path)
        return len(self.tensors) - 1

    def encode(self, value: Any, path: str, depth: int = 0) -> Any:
        if depth > MAX_TREE_DEPTH:
            raise StateError(f"{path}: the state nests deeper than {MAX_TREE_DEPTH} levels and cannot be checkpointed")
        if value is None or type(value) in (bool, str, int, float):
            return value
        if isinstance(value, torch.Tensor):
            if self.sharded is not None and _is_dtensor(value):
                self.sharded[path] = value
                return {"st": path}
            return {"t": self.tensor(value, path)}
        if isinstance(value, dict):
            return {
                "d": [
                    [self.encode(k, f"{path}[{k!r}](key)", depth + 1), self.encode(v, f"{path}[{k!r}]", depth + 1)]
                    for k, v in value.items()
                ]
            }
        if isinstance(value, torch.Size):
            return {"sz": list(value)}
        if isinstance(value, list):
            return [self.encode(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
        if isinstance(value, tuple):
            return {"tu": [self.encode(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]}
        if isinstance(value, (bytes, bytearray)):
            return {"b": base64.b64encode(bytes(value)).decode("ascii")}
        if isinstance(value, torch.dtype):
            return {"dt": str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {"dev": str(value)}
        module = type(value).__module__
        if module == "numpy":
            import numpy as np  # only reached when the state holds numpy values

            if isinstance(value, np.ndarray):
                return {"np": self.tensor(torch.from_numpy(np.ascontiguousarray(value)), path)}
            if isinstance(value, np.generic):
                return self.encode(value.item(), path, depth)
        node = encode_value(value, lambda v, p: self.encode(v, p, depth + 1), path)
        if node is not NotImplemented:
            return node
        if isinstance(value, (bool, str)):  # subclasses that are no Enum
            return bool(value) if isinstance(value, bool) else str(value)
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return float(value)
        raise StateError(
            f"{path}: values of type {type(value).__module__}.{type(value).__qualname__} cannot be "
            "checkpointed; use tensors, numbers, strings, bytes, lists, tuples, dicts, sets, paths, enums, "
            "dataclasses, datetimes, argparse namespaces, OmegaConf configs, or an object with "
            "state_dict()/load_state_dict()"
        )


def as_cpu_contiguous(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cpu":
        t = t.to("cpu")
    return t if t.is_contiguous() else t.contiguous()


def flatten(
    tree: Any, *, name: str = "state", sharded: dict[str, torch.Tensor] | None = None, paths: list[str] | None = None,
) -> tuple[Any, list[torch.Tensor]]:
    """Split a tree into a JSON-able skeleton (tensors replaced by ``{"t": index}``) and the
    list of (detached, untouched) tensors. Unsupported values raise StateError naming the path.
    With ``sharded``, DTensors are collected there by path (``{"st": path}`` in the skeleton):
    they are saved through torch.distributed.checkpoint, which can reshard them."""
    enc = _Encoder(to_cpu=False, sharded=sharded)
    skeleton = enc.encode(tree, name)
    if paths is not None:  # where each tensor sits, for names in the files
        paths.extend(enc.paths)
    return skeleton, enc.tensors


def unflatten(
    skeleton: Any, tensors: list[torch.Tensor], *, where: str, sharded: dict[str, torch.Tensor] | None = None,
    rules: DecodeRules | None = None,
) -> Any:
    """Inverse of ``flatten``. ``rules``: which of the user's classes may be rebuilt (none by
    default: see ``values``)."""
    return _Decoder(tensors, where, sharded or {}, rules).decode(skeleton)


_KEY_RE = re.compile(r"""\[(?:'((?:[^'\\]|\\.)*)'|"((?:[^"\\]|\\.)*)"|(-?\d+))\]""")


def tensor_names(paths: list[str], root: str, chosen: list[str | None] | None = None) -> list[str]:
    """Readable, unique safetensors names for tensors at these tree paths:
    ``state['model']['fc.weight']`` becomes ``model.fc.weight`` (``chosen[i]``, when given, is
    the name tensor ``i`` gets instead)."""
    names, seen = [], {"__metadata__"}
    for i, path in enumerate(paths):
        rest = path[len(root):] if path.startswith(root) else path
        name = (chosen[i] if chosen else None) or ".".join(a or b or c for a, b, c in _KEY_RE.findall(rest)) or rest or root
        if name in seen:
            name = f"{name}#{i}"
        seen.add(name)
        names.append(name)
    return names


def encode(tree: Any, *, name: str = "state", labels: dict[int, str] | None = None) -> EncodedFile:
    """Describe ``tree`` as a safetensors header plus tensor list. Tensors are not copied (except
    non-CPU or non-contiguous ones, which must be made contiguous CPU memory to be written).
    ``labels``: the names some tensors get in the file, by ``id()`` of the tensor in ``tree`` (a
    data file holding pieces of a state names them by their place in that state)."""
    enc = _Encoder()
    encoded_tree = enc.encode(tree, name)
    chosen = [labels.get(i) for i in enc.ids] if labels else None
    meta: dict[str, Any] = {"version": FORMAT_VERSION, "tree": encoded_tree,
                            "tensors": tensor_names(enc.paths, name, chosen)}
    complex_ = [i for i, t in enumerate(enc.tensors) if t.is_complex()]
    if complex_:
        meta["complex"] = complex_
    return safetensors_file(list(zip(meta["tensors"], enc.tensors)),
                            {"format": "pt", META_KEY: json.dumps(meta, separators=(",", ":"))})


def safetensors_file(named: list[tuple[str, torch.Tensor]], metadata: dict[str, str]) -> EncodedFile:
    """Frame named contiguous CPU tensors (names unique) as a safetensors file; a complex tensor
    goes as its real view."""
    stored = [torch.view_as_real(t) if t.is_complex() else t for _, t in named]
    # Tensors whose size is a multiple of 64 bytes first (nearly every large one): each starts
    # 64-byte aligned, as the data does (what the .ert framing gave every tensor; a 4-byte scalar
    # no longer shifts the tensors after it). Then the rest, largest element size first (a
    # complex tensor's, not its real view's): each still starts at a multiple of its own element
    # size, so a file in memory can be viewed without copies. Safetensors allows no padding.
    order = sorted(range(len(stored)), key=lambda i: (
        stored[i].numel() * stored[i].element_size() % ALIGN != 0, -named[i][1].element_size()))
    entries: dict[str, Any] = {}
    offsets, pos = [0] * len(stored), 0
    for i in order:
        t = stored[i]
        nbytes = t.numel() * t.element_size()
        entries[named[i][0]] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + nbytes]}
        offsets[i], pos = pos, pos + nbytes
    header_json = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
    pad = _align(_LEN.size + len(header_json)) - _LEN.size - len(header_json)
    header = _LEN.pack(len(header_json) + pad) + header_json + b" " * pad
    return EncodedFile(header=header, tensors=[stored[i] for i in order], offsets=[offsets[i] for i in order],
                       size=len(header) + pos)


def sniff_unsafe(prefix: bytes) -> str | None:
    """Name the format of a file that would need unpickling, or None."""
    if prefix.startswith(b"PK\x03\x04"):
        return "a zip archive (torch.save format, which contains a pickle)"
    if prefix[:2] in _PICKLE_HINTS or prefix[:1] == b"\x80":
        return "a Python pickle"
    return None


class _Decoder:
    """Rebuilds a tree from its JSON skeleton. The skeleton is untrusted (it comes from a file,
    even when the file's digest matches): every node's type, every tensor reference and the
    nesting depth are checked, and every failure is a CheckpointCorruptError naming the file."""

    def __init__(self, tensors: list[Any], where: str, sharded: dict[str, torch.Tensor] | None = None,
                 rules: DecodeRules | None = None) -> None:
        self.tensors = tensors
        self.where = where
        self.sharded = sharded or {}
        self.rules = rules or DecodeRules()

    def fail(self, reason: str) -> CheckpointCorruptError:
        return CheckpointCorruptError(None, self.where, f"malformed data header: {reason}")

    def tensor(self, idx: Any) -> torch.Tensor:
        if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < len(self.tensors):
            raise self.fail(f"tensor reference {str(idx)[:40]!r} out of range")
        return self.tensors[idx]

    def decode(self, node: Any) -> Any:
        try:
            return self._decode(node, 0)
        except CheckpointCorruptError:
            raise
        except _DECODE_FAILURES as e:
            raise self.fail(f"{type(e).__name__}: {str(e)[:200]}") from None

    def _decode(self, node: Any, depth: int) -> Any:
        if depth > MAX_TREE_DEPTH:
            raise self.fail(f"the tree nests deeper than {MAX_TREE_DEPTH} levels")
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, list):
            return [self._decode(v, depth + 1) for v in node]
        if isinstance(node, dict) and len(node) == 1:
            ((tag, payload),) = node.items()
            if tag == "t":
                return self.tensor(payload)
            if tag == "d" and isinstance(payload, list):
                out = {}
                for pair in payload:
                    if not isinstance(pair, list) or len(pair) != 2:
                        raise self.fail("dict entry is not a key/value pair")
                    key = self._decode(pair[0], depth + 1)
                    try:
                        out[key] = self._decode(pair[1], depth + 1)
                    except TypeError as e:  # unhashable key
                        if isinstance(key, dict):  # an instance of a class not allowlisted, in plain form
                            raise self.fail("a dict key is an instance of a class not in allowed_classes "
                                            "(allowlist it to load this state)") from None
                        raise self.fail(str(e)) from None
                return out
            if tag == "tu" and isinstance(payload, list):
                return tuple(self._decode(v, depth + 1) for v in payload)
            if tag == "sz" and _is_shape(payload):
                return torch.Size(payload)
            if tag == "b" and isinstance(payload, str):
                try:
                    return base64.b64decode(payload, validate=True)
                except (binascii.Error, ValueError):
                    raise self.fail("bytes value is not valid base64") from None
            if tag == "dt" and isinstance(payload, str) and payload in DTYPES:
                return DTYPES[payload]
            if tag == "dev" and isinstance(payload, str) and len(payload) < 64:
                try:
                    return torch.device(payload)
                except (RuntimeError, ValueError):
                    raise self.fail(f"unknown device {payload!r}") from None
            if tag == "np":
                t = self.tensor(payload)
                return t.numpy() if t.device.type == "cpu" else t
            if tag == "st" and isinstance(payload, str):
                if payload not in self.sharded:
                    raise self.fail(f"sharded tensor {payload[:80]!r} was not loaded")
                return self.sharded[payload]
            value = decode_value(tag, payload, lambda n: self._decode(n, depth + 1), self.fail, self.rules)
            if value is not NotImplemented:
                return value
        raise self.fail(f"unknown node {str(node)[:80]}")


def _is_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_shape(v: Any) -> TypeGuard[list[int]]:
    return (isinstance(v, list) and len(v) <= _MAX_DIMS
            and all(_is_int(s) and 0 <= s <= _MAX_DIM_SIZE for s in v))


def _refuse_foreign(head: bytes, where: str) -> CheckpointCorruptError:
    unsafe = sniff_unsafe(head)
    if unsafe:
        return UnsafeCheckpointError(
            None, where, f"holds {unsafe}; elastic-resume never unpickles checkpoint data, "
            "since loading a pickle can execute arbitrary code"
        )
    return CheckpointCorruptError(None, where, "not an elastic-resume data file (bad magic bytes)")


def _check_header(head: bytes, size: int, where: str) -> int:
    """Validate the first 16 bytes of an ``.ert`` file; return the JSON header's length."""
    if size < 16:
        raise CheckpointCorruptError(None, where, "truncated header")
    (hlen,) = _LEN.unpack(head[8:16])
    if hlen > _HEADER_LIMIT or 16 + hlen > size:
        raise CheckpointCorruptError(None, where, f"header length {hlen} exceeds file size {size}")
    return hlen


@dataclass
class _Layout:
    """Where a file's tensors are, checked against the file: (dtype, shape, absolute offset,
    nbytes) in the tree's index order, which of them are complex (stored as their real view),
    and the tree."""

    tree: Any
    table: list[tuple[torch.dtype, list[int], int, int]]
    complex: frozenset[int] = frozenset()


def _layout(head: bytes, read: Callable[[int], bytes], size: int, where: str) -> _Layout:
    """Parse a file's header, either framing. ``head`` is its first ``min(16, size)`` bytes and
    ``read(n)`` returns the next ``n``."""
    if head.startswith(MAGIC):
        hlen = _check_header(head, size, where)
        header = _parse_header(read(hlen), where)
        table = _tensor_table(header, size, _align(16 + hlen), where)
        return _Layout(header["tree"], table)
    if len(head) > _LEN.size and head[_LEN.size:_LEN.size + 1] == b"{":
        if size < 16:
            raise CheckpointCorruptError(None, where, "truncated header")
        (hlen,) = _LEN.unpack(head[:8])
        if hlen > _HEADER_LIMIT or 8 + hlen > size or hlen < 8:
            raise CheckpointCorruptError(None, where, f"header length {hlen} does not fit the file size {size}")
        header = _parse_header(head[8:] + read(hlen - (len(head) - 8)), where)
        return _safetensors_layout(header, size, 8 + hlen, where)
    raise _refuse_foreign(head, where)


def _safetensors_layout(header: Any, size: int, data_start: int, where: str) -> _Layout:
    """Every field type- and bounds-checked against the file (untrusted input: nothing here may
    allocate by what the header claims). The tensors must cover the data exactly: back to back,
    no holes, no overlap, nothing after the last (what safetensors itself requires)."""
    def fail(reason: str) -> CheckpointCorruptError:
        return CheckpointCorruptError(None, where, f"malformed data header: {reason}")

    if not isinstance(header, dict):
        raise fail("the header is not an object")
    meta_text = header.get("__metadata__", {}).get(META_KEY) if isinstance(header.get("__metadata__"), dict) else None
    if not isinstance(meta_text, str):
        raise CheckpointCorruptError(None, where, "a safetensors file without elastic-resume metadata "
                                     "(not a checkpoint data file)")
    meta = _parse_header(meta_text.encode(), where)
    if not isinstance(meta, dict) or meta.get("version") != FORMAT_VERSION:
        version = meta.get("version") if isinstance(meta, dict) else meta
        raise CheckpointCorruptError(None, where, f"unknown data format version {str(version)[:40]!r}")
    names, complex_ = meta.get("tensors"), meta.get("complex", [])
    if "tree" not in meta:
        raise fail("no tree")
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise fail("the tensor list is not a list of names")
    if len(names) != len(entries) or set(names) != set(entries):
        raise fail("the tensor list does not name exactly the file's tensors")
    if not isinstance(complex_, list) or not all(_is_int(i) and 0 <= i < len(names) for i in complex_):
        raise fail("the complex tensor list is invalid")
    spans: list[tuple[int, int, str]] = []
    by_name: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
    for name, entry in entries.items():
        label = name[:80]
        if not isinstance(entry, dict):
            raise fail(f"tensor {label!r} is not an object")
        dtype_name, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype_name, str) or dtype_name not in _FROM_ST:
            raise fail(f"tensor {label!r} has unknown dtype {str(dtype_name)[:40]!r}")
        if not _is_shape(shape):
            raise fail(f"tensor {label!r} has an invalid shape")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise fail(f"tensor {label!r} has invalid data offsets")
        dtype = _FROM_ST[dtype_name]
        begin, end = offsets
        if _numel(shape, size) * _ITEMSIZE[dtype] != end - begin:
            raise fail(f"tensor {label!r} has a size that does not match its shape")
        if (data_start + begin) % _ITEMSIZE[dtype]:
            raise fail(f"tensor {label!r} is not aligned to its element size")
        spans.append((begin, end, name))
        by_name[name] = (dtype, shape, data_start + begin, end - begin)
    pos = 0
    for begin, end, name in sorted(spans, key=lambda s: (s[0], s[1])):
        if begin != pos:
            raise fail(f"tensor {name[:80]!r} {'overlaps another' if begin < pos else 'leaves a hole before it'}")
        pos = end
    if data_start + pos != size:
        raise fail(f"the tensors cover {pos} of the file's {size - data_start} data bytes")
    for i in complex_:
        dtype, shape, offset, _ = by_name[names[i]]
        if (dtype not in (torch.float32, torch.float64) or not shape or shape[-1] != 2
                or offset % (2 * _ITEMSIZE[dtype])):
            raise fail(f"complex tensor {names[i][:80]!r} is not stored as a real view")
    return _Layout(meta["tree"], [by_name[n] for n in names], frozenset(complex_))


def _numel(shape: list[int], size: int) -> int:
    numel = 1
    for s in shape:
        numel *= s
        if numel > size:  # more elements than the file has bytes: stop before the product grows
            break
    return numel


def _tensor_table(header: Any, size: int, data_start: int, where: str) -> list[tuple[torch.dtype, list[int], int, int]]:
    """(dtype, shape, absolute offset, nbytes) per tensor, every field type- and bounds-checked
    against the file (untrusted input: nothing here may allocate by what the header claims)."""
    def fail(reason: str) -> CheckpointCorruptError:
        return CheckpointCorruptError(None, where, f"malformed data header: {reason}")

    if not isinstance(header, dict) or header.get("version") != 1:
        version = header.get("version") if isinstance(header, dict) else header
        raise CheckpointCorruptError(None, where, f"unknown data format version {str(version)[:40]!r}")
    entries = header.get("tensors")
    if not isinstance(entries, list):
        raise fail("the tensor table is not a list")
    if "tree" not in header:
        raise fail("no tree")
    table: list[tuple[torch.dtype, list[int], int, int]] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise fail(f"tensor entry {i} is not an object")
        dtype_name, shape, offset, nbytes = entry.get("dtype"), entry.get("shape"), entry.get("offset"), entry.get("nbytes")
        if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
            raise fail(f"tensor entry {i} has unknown dtype {str(dtype_name)[:40]!r}")
        if not _is_shape(shape):
            raise fail(f"tensor entry {i} has an invalid shape")
        if not _is_int(offset) or not _is_int(nbytes) or offset < 0 or nbytes < 0:
            raise fail(f"tensor entry {i} has an invalid offset or size")
        dtype = DTYPES[dtype_name]
        if nbytes != _numel(shape, size) * _ITEMSIZE[dtype] or offset % ALIGN:
            raise fail(f"tensor entry {i} has inconsistent size or offset")
        if data_start + offset + nbytes > size:
            raise fail(f"tensor entry {i} extends past the end of the file")
        table.append((dtype, shape, data_start + offset, nbytes))
    return table


def _parse_header(raw: bytes, where: str) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointCorruptError(None, where, f"header is not valid JSON ({str(e)[:200]})") from None
    except RecursionError:
        raise CheckpointCorruptError(None, where, "malformed data header: nested too deeply") from None


def _tree(tensors: list[Any], layout: _Layout, where: str, rules: DecodeRules | None = None) -> Any:
    for i in layout.complex:
        tensors[i] = torch.view_as_complex(tensors[i])
    return _Decoder(tensors, where, rules=rules).decode(layout.tree)


def decode_stream(stream: Any, *, where: str, materialize: bool = True) -> Any:
    """Rebuild the tree while reading the file once, front to back: each tensor is read straight
    into storage of its own (no shared buffer for loaded objects to alias and keep alive, no
    copy). ``stream`` is a storage ByteStream; the caller checks its digest afterwards.
    ``materialize=False`` checks that the file decodes without keeping its tensors: their bytes
    are hashed and dropped, and the tree holds shape-only ``meta`` tensors (verification)."""
    size = stream.size

    def read(n: int) -> bytes:
        raw = bytearray(n)
        stream.readinto_exact(memoryview(raw))
        return bytes(raw)

    layout = _layout(read(min(16, size)), read, size, where)
    # By offset, an empty tensor before a non-empty one at the same offset.
    order = sorted(range(len(layout.table)), key=lambda i: (layout.table[i][2], layout.table[i][3]))
    tensors: list[Any] = [None] * len(layout.table)
    for i in order:
        dtype, shape, offset, nbytes = layout.table[i]
        if offset < stream.pos:
            raise CheckpointCorruptError(None, where, f"tensor entry {i} overlaps another")
        stream.skip(offset - stream.pos)
        if materialize:
            t = torch.empty(shape, dtype=dtype)
            if nbytes:
                stream.readinto_exact(tensor_bytes(t))
        else:
            t = torch.empty(shape, dtype=dtype, device="meta")
            stream.skip(nbytes)
        tensors[i] = t
    return _tree(tensors, layout, where)


def decode(buf: torch.Tensor, *, where: str, rules: DecodeRules | None = None) -> Any:
    """Rebuild the tree from a file's bytes already in memory (a uint8 tensor). Tensors are
    views into ``buf`` (no copy); used where the consumer copies them out at once (DCP shards).
    ``where`` names the file in errors."""
    size = buf.numel()
    pos = min(size, 16)

    def read(n: int) -> bytes:
        nonlocal pos
        pos += n
        return bytes(tensor_bytes(buf[pos - n : pos]))

    layout = _layout(bytes(tensor_bytes(buf[:pos])), read, size, where)
    tensors: list[Any] = [
        torch.empty(shape, dtype=dtype) if nbytes == 0 else buf[offset : offset + nbytes].view(dtype).view(shape)
        for dtype, shape, offset, nbytes in layout.table
    ]
    return _tree(tensors, layout, where, rules)


def encodable(value: Any, path: str) -> bool:
    """Whether ``value`` can be saved in a checkpoint tree (tensors included, nothing copied)."""
    try:
        _Encoder(to_cpu=False).encode(value, path)
    except StateError:
        return False
    return True
