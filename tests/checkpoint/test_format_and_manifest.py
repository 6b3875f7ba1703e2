"""Unit tests of pure logic: the data-file format and manifest validation. No processes, no storage."""

from __future__ import annotations

import io
import json
import pickle

import pytest
import torch

from elastic_resume.checkpoint.format import decode, encode
from elastic_resume.checkpoint.layout import (
    is_safe_relative_path,
    parse_step_dir,
    step_dir,
)
from elastic_resume.checkpoint.manifest import FileEntry, Manifest, canonical_json
from elastic_resume.errors import (
    CheckpointCorruptError,
    StateError,
    UnsafeCheckpointError,
)
from elastic_resume.storage import digest_bytes


def roundtrip(tree):
    enc = encode(tree)
    data = b"".join(bytes(c) for c in enc.chunks())
    assert len(data) == enc.size
    return decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), where="mem")


def test_format_round_trips_every_supported_type():
    import numpy as np

    tree = {
        "f32": torch.randn(3, 4),
        "bf16": torch.randn(5).to(torch.bfloat16),
        "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 3),
        "noncontig": torch.arange(12).reshape(3, 4).t(),
        "ints": {0: 1, 1: -(2**70)},  # int keys (optimizer state) and big ints (Python RNG)
        "tuple": (1, 2.0, "x", None, True),
        "bytes": b"\x00\xff",
        "dtype": torch.float16,
        "size": torch.Size([2, 3]),
        "nan": float("nan"),
        "np": np.arange(5, dtype=np.uint32),
        "list": [torch.ones(2), {"nested": (torch.zeros(1),)}],
    }
    out = roundtrip(tree)
    for k in ("f32", "bf16", "bool", "scalar", "empty", "noncontig"):
        assert out[k].dtype == tree[k].dtype and torch.equal(out[k], tree[k]), k
    assert out["ints"] == {0: 1, 1: -(2**70)} and list(out["ints"]) == [0, 1]
    assert out["tuple"] == (1, 2.0, "x", None, True) and isinstance(out["tuple"][1], float)
    assert out["bytes"] == b"\x00\xff" and out["dtype"] is torch.float16
    assert out["size"] == torch.Size([2, 3])
    assert out["nan"] != out["nan"]
    assert isinstance(out["np"], np.ndarray) and out["np"].tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(out["list"][1]["nested"][0], torch.zeros(1))


def test_tensors_start_aligned_to_their_element_size_with_no_holes():
    enc = encode({"a": torch.ones(3, dtype=torch.int8), "b": torch.ones(5, dtype=torch.float64),
                  "c": torch.ones(3, dtype=torch.complex64), "d": torch.ones(1, dtype=torch.float16)})
    assert len(enc.header) % 64 == 0
    assert [(t.element_size(), off) for t, off in zip(enc.tensors, enc.offsets)] == [(8, 0), (4, 40), (2, 64), (1, 66)]
    assert enc.size == len(enc.header) + 69


def test_tensors_of_whole_64_byte_blocks_come_first_and_stay_64_byte_aligned():
    enc = encode({"scalar": torch.tensor(1.0), "w": torch.ones(64, 3), "b": torch.ones(3), "v": torch.ones(16)})
    assert [(tuple(t.shape), off) for t, off in zip(enc.tensors, enc.offsets)] == [
        ((64, 3), 0), ((16,), 768), ((), 832), ((3,), 836)]


def test_encode_refuses_unknown_objects_naming_the_path():
    class Custom:
        pass

    with pytest.raises(StateError, match=r"state\['opt'\]\[0\].*Custom.*cannot be checkpointed"):
        encode({"opt": [Custom()]}, name="state")


def test_decode_refuses_torch_save_and_pickle_without_running_them():
    ran = []

    class Boom:
        def __reduce__(self):
            return (ran.append, ("executed",))

    buf = io.BytesIO()
    torch.save({"x": Boom()}, buf)
    for payload in (buf.getvalue(), pickle.dumps(Boom())):
        with pytest.raises(UnsafeCheckpointError, match="never unpickles"):
            decode(torch.frombuffer(bytearray(payload), dtype=torch.uint8), where="f")
    assert ran == []


@pytest.mark.parametrize("cut", [0, 5, 16, 40])
def test_decode_rejects_truncated_headers(cut):
    enc = encode({"x": torch.ones(100)})
    data = b"".join(bytes(c) for c in enc.chunks())[:cut] or b"\x00"
    with pytest.raises(CheckpointCorruptError):
        decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), where="f")


@pytest.mark.parametrize("offsets, why", [([1 << 20, (1 << 20) + 16], "leaves a hole"),
                                          ([0, 32], "size that does not match"),
                                          ([0, 8], "size that does not match")])
def test_decode_rejects_tensor_table_not_covering_the_file_exactly(offsets, why):
    enc = encode({"x": torch.ones(4)})
    data = bytearray(b"".join(bytes(c) for c in enc.chunks()))
    hlen = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + hlen])
    header["x"]["data_offsets"] = offsets
    new = json.dumps(header).encode()
    new += b" " * (-(8 + len(new)) % 64)  # keep the data aligned, as the writer does
    data = bytearray(len(new).to_bytes(8, "little") + new + data[8 + hlen :])
    with pytest.raises(CheckpointCorruptError, match=why):
        decode(torch.frombuffer(data, dtype=torch.uint8), where="f")


def test_decode_rejects_a_file_longer_than_its_tensors():
    enc = encode({"x": torch.ones(4)})
    data = bytearray(b"".join(bytes(c) for c in enc.chunks()) + b"\0" * 8)
    with pytest.raises(CheckpointCorruptError, match="cover 16 of the file's 24 data bytes"):
        decode(torch.frombuffer(data, dtype=torch.uint8), where="f")


def manifest_bytes(**over):
    m = Manifest(step=7, attempt="att1", world_size=2,
                 files=[FileEntry("att1/rank-00000.safetensors", 10, "xxh3_64:00", 0)], metadata={"loss": 1.5})
    doc = json.loads(m.to_bytes())
    doc.update(over)
    doc.pop("checksum")
    doc["checksum"] = digest_bytes(canonical_json(doc))
    return json.dumps(doc).encode()


def test_manifest_round_trip_and_checksum():
    m = Manifest.parse(manifest_bytes(), step=7, where="M")
    assert (m.step, m.attempt, m.world_size, m.metadata) == (7, "att1", 2, {"loss": 1.5})
    doc = json.loads(manifest_bytes())
    doc["world_size"] = 3  # edited without fixing the checksum
    with pytest.raises(CheckpointCorruptError, match="checksum does not match"):
        Manifest.parse(json.dumps(doc).encode(), step=7, where="M")


@pytest.mark.parametrize(
    "over, match",
    [
        ({"version": 2}, "unknown manifest version 2"),
        ({"format": "other"}, "not an elastic-resume manifest"),
        ({"step": 8}, "manifest says step 8"),
        ({"files": []}, "lists no files"),
        ({"files": [{"path": "att1/../x", "size": 1, "digest": "xxh3_64:0", "rank": 0}]}, "unsafe path"),
        ({"files": [{"path": "/abs/x", "size": 1, "digest": "xxh3_64:0", "rank": 0}]}, "unsafe path"),
        ({"files": [{"path": "s3://bucket/x", "size": 1, "digest": "xxh3_64:0", "rank": 0}]}, "unsafe path"),
        ({"files": [{"path": "other/x.ert", "size": 1, "digest": "xxh3_64:0", "rank": 0}]}, "under 'att1/'"),
        ({"files": [{"path": "att1/x", "size": -1, "digest": "xxh3_64:0", "rank": 0}]}, "invalid size"),
        ({"files": [{"path": "att1/x", "size": 1, "digest": "md5:0", "rank": 0}]}, "unsupported digest"),
        ({"attempt": "../x"}, "invalid attempt id"),
    ],
)
def test_manifest_rejects(over, match):
    with pytest.raises(CheckpointCorruptError, match=match):
        Manifest.parse(manifest_bytes(**over), step=7, where="M")


def test_manifest_rejects_garbage():
    with pytest.raises(CheckpointCorruptError, match="not valid JSON"):
        Manifest.parse(b"{nope", step=1, where="M")
    with pytest.raises(CheckpointCorruptError, match="not a JSON object"):
        Manifest.parse(b"[1]", step=1, where="M")


def test_manifest_metadata_with_non_finite_values_is_strict_json():
    m = Manifest(step=1, attempt="a", world_size=1, files=[FileEntry("a/x", 1, "xxh3_64:0", 0)],
                 metadata={"loss": float("inf")})
    json.loads(m.to_bytes(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


@pytest.mark.parametrize("path, ok", [("a/b.ert", True), ("a", True), ("a/../b", False), ("../a", False),
                                      ("/a", False), ("a//b", False), ("./a", False), ("a\\b", False),
                                      ("s3://b/k", False), ("", False), (None, False)])
def test_safe_relative_paths(path, ok):
    assert is_safe_relative_path(path) is ok


def test_step_dir_names_sort_and_parse():
    assert step_dir(1200) == "step-000000001200"
    assert parse_step_dir("step-000000001200") == 1200
    assert parse_step_dir("step-12") is None and parse_step_dir("other") is None
    assert sorted([step_dir(10), step_dir(9), step_dir(100)]) == [step_dir(9), step_dir(10), step_dir(100)]
