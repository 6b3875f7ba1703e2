"""The data-file framing written before 0.6 (``.ert``: magic, a JSON header, 64-byte aligned
tensors), kept here only so bench_store.py can time it beside today's safetensors framing in one
run. The library still reads these files; it no longer writes them."""

from __future__ import annotations

import json
from typing import Any

from elastic_resume.checkpoint.format import ALIGN, MAGIC, EncodedFile, _Encoder


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def encode(tree: Any, *, name: str = "state", labels: dict[int, str] | None = None) -> EncodedFile:
    enc = _Encoder()
    encoded_tree = enc.encode(tree, name)
    table, offsets, offset = [], [], 0
    for t in enc.tensors:
        nbytes = t.numel() * t.element_size()
        offset = _align(offset)
        offsets.append(offset)
        table.append({"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "offset": offset,
                      "nbytes": nbytes})
        offset += nbytes
    header_json = json.dumps({"version": 1, "tree": encoded_tree, "tensors": table}, separators=(",", ":")).encode()
    header = MAGIC + len(header_json).to_bytes(8, "little") + header_json
    header += bytes(_align(len(header)) - len(header))
    return EncodedFile(header=header, tensors=enc.tensors, offsets=offsets,
                       size=len(header) + (_align(offset) if offset else 0))
