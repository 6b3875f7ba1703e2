"""Property-based fuzzing of the decoders that read untrusted bytes: manifests and data-file
headers, mutated anywhere (checksums and digests recomputed, so only the decoding itself stands
between the bytes and the process). The only exception allowed out is the project's own
CheckpointCorruptError, and no tensor larger than the file is ever allocated. A bounded number
of examples runs in CI."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elastic_resume.checkpoint import format as data_format
from elastic_resume.checkpoint.format import ALIGN, MAGIC, META_KEY, decode, encode
from elastic_resume.checkpoint.manifest import Manifest, canonical_json
from elastic_resume.errors import CheckpointCorruptError
from elastic_resume.storage import digest_bytes

FIXTURES = Path(__file__).parent.parent / "fixtures" / "written-by-0.2.0"
# CI runs a fixed, reproducible set of examples (a landing must not depend on luck); a local
# run explores new ones each time.
_IN_CI = bool(os.environ.get("CI"))
FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize=_IN_CI, database=None if _IN_CI else settings.default.database)

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
)
json_value = st.recursive(
    json_leaf,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=6), children, max_size=4)),
    max_leaves=20,
)


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


def _replace(doc: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(doc, dict):
        return {**doc, head: _replace(doc[head], rest, value)}
    copy = list(doc)
    copy[head] = _replace(doc[head], rest, value)
    return copy


def _state() -> dict:
    return {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "opt": {0: {"m": torch.ones(3)}},
            "t": (1, 2.5, "x"), "b": b"\x00\x01", "dt": torch.float16, "dev": torch.device("cpu"),
            "sz": torch.Size([2, 3])}


VALID_FILE = encode({"skeleton": None, "tensors": {0: torch.ones(4)}, "tree": _state()})
_VALID_BYTES = b"".join(bytes(c) for c in VALID_FILE.chunks())
_HLEN = int.from_bytes(_VALID_BYTES[:8], "little")
#: The safetensors header, its elastic-resume metadata (the tree) parsed too, so both are fuzzed.
VALID_HEADER = json.loads(_VALID_BYTES[8 : 8 + _HLEN])
VALID_HEADER["__metadata__"][META_KEY] = json.loads(VALID_HEADER["__metadata__"][META_KEY])
_BODY = _VALID_BYTES[8 + _HLEN :]

#: A data file written by 0.2.0 (the ``.ert`` framing, still read).
_LEGACY_BYTES = next(FIXTURES.glob("plain/step-*/*/shared-00000.ert")).read_bytes()
_LEGACY_HLEN = int.from_bytes(_LEGACY_BYTES[8:16], "little")
LEGACY_HEADER = json.loads(_LEGACY_BYTES[16 : 16 + _LEGACY_HLEN])
_LEGACY_BODY = _LEGACY_BYTES[(16 + _LEGACY_HLEN + ALIGN - 1) // ALIGN * ALIGN :]


def _file_with_header(text: bytes, body: bytes = _BODY) -> torch.Tensor:
    """A safetensors-framed file: the header padded with spaces as the writer does."""
    text += b" " * (-(8 + len(text)) % ALIGN)
    return torch.frombuffer(bytearray(len(text).to_bytes(8, "little") + text + body), dtype=torch.uint8)


def _header_text(header: Any) -> bytes:
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if isinstance(meta, dict) and isinstance(meta.get(META_KEY), (dict, list)):
        header = dict(header, __metadata__=dict(meta, **{META_KEY: json.dumps(meta[META_KEY])}))
    return json.dumps(header).encode()


def _legacy_file_with_header(text: bytes) -> torch.Tensor:
    head = MAGIC + len(text).to_bytes(8, "little") + text
    head += bytes((len(head) + ALIGN - 1) // ALIGN * ALIGN - len(head))
    return torch.frombuffer(bytearray(head + _LEGACY_BODY), dtype=torch.uint8)


def test_the_fuzzed_files_decode_unchanged():
    assert decode(_file_with_header(_header_text(VALID_HEADER)), where="f")["tree"]["t"] == (1, 2.5, "x")
    out = decode(_legacy_file_with_header(json.dumps(LEGACY_HEADER).encode()), where="f")
    assert out["tensors"] and out["skeleton"] is not None


_REAL_EMPTY = torch.empty


class _AllocationGuard:
    """Wraps torch.empty while decoding: records the largest tensor requested."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.largest = 0
        real = _REAL_EMPTY

        def empty(*shape: Any, **kw: Any) -> torch.Tensor:
            dims = shape[0] if len(shape) == 1 and isinstance(shape[0], (list, tuple, torch.Size)) else shape
            numel = 1
            for d in dims:
                numel *= int(d)
            if kw.get("device") != "meta":
                self.largest = max(self.largest, numel * 16)
            return real(*shape, **kw)

        monkeypatch.setattr(data_format.torch, "empty", empty)


def _decode_checked(buf: torch.Tensor) -> None:
    try:
        decode(buf, where="fuzz.safetensors")
    except CheckpointCorruptError:
        pass


@FUZZ
@given(data=st.data())
def test_data_header_with_any_field_replaced_decodes_or_is_corruption(data, monkeypatch_module):
    path = data.draw(st.sampled_from(_paths(VALID_HEADER)))
    header = _replace(VALID_HEADER, path, data.draw(json_value))
    buf = _file_with_header(_header_text(header))
    guard = _AllocationGuard(monkeypatch_module)
    _decode_checked(buf)
    assert guard.largest <= 16 * buf.numel()  # nothing larger than the file itself


@FUZZ
@given(data=st.data())
def test_legacy_data_header_with_any_field_replaced_decodes_or_is_corruption(data, monkeypatch_module):
    path = data.draw(st.sampled_from(_paths(LEGACY_HEADER)))
    header = _replace(LEGACY_HEADER, path, data.draw(json_value))
    buf = _legacy_file_with_header(json.dumps(header).encode())
    guard = _AllocationGuard(monkeypatch_module)
    _decode_checked(buf)
    assert guard.largest <= 16 * buf.numel()


@FUZZ
@given(text=st.binary(max_size=300), legacy=st.booleans())
def test_data_header_of_arbitrary_bytes_is_corruption(text, legacy):
    with pytest.raises(CheckpointCorruptError):
        decode(_legacy_file_with_header(text) if legacy else _file_with_header(text), where="fuzz.safetensors")


@settings(max_examples=40, deadline=None, derandomize=_IN_CI)
@given(depth=st.integers(min_value=250, max_value=20000), opener=st.sampled_from(["[", '{"d":[[1,', '{"tu":[']),
       where=st.sampled_from(["tree", "header"]))
def test_deeply_nested_header_is_corruption(depth, opener, where):
    closer = {"[": "]", '{"d":[[1,': "]]}", '{"tu":[': "]}"}[opener]
    nested = opener * depth + "0" + closer * depth
    if where == "tree":  # inside the metadata's JSON text
        meta = json.dumps(dict(VALID_HEADER["__metadata__"][META_KEY], tree=None)).replace('"tree": null', f'"tree": {nested}')
        text = _header_text(dict(VALID_HEADER, __metadata__={META_KEY: meta}))
    else:  # the safetensors header itself
        text = _header_text(dict(VALID_HEADER, extra=None)).replace(b'"extra": null', f'"extra": {nested}'.encode())
    with pytest.raises(CheckpointCorruptError):
        decode(_file_with_header(text), where="fuzz.safetensors")


def _valid_manifest_doc() -> dict:
    m = Manifest(step=7, attempt="20261201T000000-abcdef0123", world_size=2,
                 files=[], metadata={"loss": 0.5}, fingerprint={"versions.torch": "2.13"},
                 health={"healthy": True}, extra={"replicated_tensors": 3, "per_rank_keys": ["rng"],
                                                  "replicated_keys": ["model"]})
    from elastic_resume.checkpoint.manifest import FileEntry

    m.files = [FileEntry(f"{m.attempt}/shared-00000.safetensors", 128, "xxh3_64:0123456789abcdef", 0, "shared"),
               FileEntry(f"{m.attempt}/rank-00001.safetensors", 64, "xxh3_64:fedcba9876543210", 1, "rank")]
    return json.loads(m.to_bytes())


VALID_MANIFEST = _valid_manifest_doc()


def _with_checksum(doc: Any) -> bytes:
    if isinstance(doc, dict):
        body = {k: v for k, v in doc.items() if k != "checksum"}
        try:
            doc = dict(body, checksum=digest_bytes(canonical_json(body)))
        except (ValueError, TypeError):
            pass
    return json.dumps(doc).encode()


@FUZZ
@given(data=st.data())
def test_manifest_with_any_field_replaced_parses_or_is_corruption(data):
    path = data.draw(st.sampled_from([p for p in _paths(VALID_MANIFEST) if p != ("checksum",)]))
    doc = _replace(VALID_MANIFEST, path, data.draw(json_value))
    try:
        m = Manifest.parse(_with_checksum(doc), step=7, where="MANIFEST.json")
    except CheckpointCorruptError:
        return
    # What parses is sane: safe paths, bounded counts, a real date.
    assert all(f.path.startswith(m.attempt + "/") and ".." not in f.path for f in m.files)
    assert 0 <= m.created < 1e11
    assert 0 <= m.extra.get("replicated_tensors", 0) <= 10_000_000


@FUZZ
@given(raw=st.binary(max_size=500))
def test_manifest_of_arbitrary_bytes_is_corruption(raw):
    with pytest.raises(CheckpointCorruptError):
        Manifest.parse(raw, step=7, where="MANIFEST.json")


def _hostile_file(node: Any) -> torch.Tensor:
    meta = {"version": 2, "tree": node, "tensors": []}
    return _file_with_header(_header_text({"__metadata__": {"format": "pt", META_KEY: meta}}), body=b"")


_MODULES = ["torch", "os", "sys", "builtins", "subprocess", "omegaconf", "collections", "enum", "pathlib",
            "elastic_resume", "no_such_module_xyz", "torch.nn", ""]
_QUALNAME = st.one_of(
    st.sampled_from(["_dynamo.source.LocalSource", "_dynamo", "Popen", "system", "__class__", "Path.__new__",
                     "nn.Module.__init__", "ops.aten", "classes", "_C._VariableFunctions", "Enum", "OrderedDict"]),
    st.text(alphabet="abcdefgxyz_.ABCDE", max_size=30),
)
class_name = st.one_of(st.builds(lambda m, q: f"{m}:{q}", st.sampled_from(_MODULES), _QUALNAME), st.text(max_size=40))


@FUZZ
@given(class_name, json_value, st.sampled_from(["enum", "dc", "type"]))
def test_a_hostile_class_name_imports_nothing_and_runs_nothing(name, payload, tag):
    import sys

    from elastic_resume.checkpoint.values import DecodeRules

    # The worst case: the user allowlisted exactly the name the file gives.
    rules = DecodeRules(frozenset({name}), warn=False)
    node = {"enum": [name, "X", payload]} if tag == "enum" else {"dc": [name, [["a", payload]]]} if tag == "dc" else {
        "type": name}
    before = set(sys.modules)
    try:
        decode(_hostile_file(node), where="evil.safetensors", rules=rules)
    except CheckpointCorruptError:
        pass
    assert set(sys.modules) == before


omegaconf_text = st.text(alphabet="${}:.,\\'\" []abc_oenvER_FUZZ_SECRET0", max_size=40)


@FUZZ
@given(st.lists(omegaconf_text, min_size=1, max_size=4))
def test_hostile_omegaconf_text_is_corruption_or_inert(monkeypatch_module, texts):
    pytest.importorskip("omegaconf")
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    monkeypatch_module.setenv("ER_FUZZ_SECRET", "the-fuzz-secret-value")
    node = {"omc": {"d": [[f"k{i}", t] for i, t in enumerate(texts)] + [["a", 1], ["b", "x"]]}}
    try:
        cfg = decode(_hostile_file(node), where="evil.safetensors")
    except CheckpointCorruptError:
        return
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException:
        return  # a reference to a missing node fails when read, as in the user's own config
    assert "the-fuzz-secret-value" not in repr(resolved)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()
