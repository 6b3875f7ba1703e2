"""Ordinary Python values (configs, hyper-parameters) through the checkpoint format: every type
round-trips without pickle, and a hostile header cannot make decoding import or call anything."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import enum
import json
import logging
import pathlib

import pytest
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from elastic_resume.checkpoint.format import _parse_header, decode, encodable, encode
from elastic_resume.checkpoint.values import DecodeRules, allowed_class_names
from elastic_resume.errors import CheckpointCorruptError, StateError


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclasses.dataclass(frozen=True)
class Optim:
    name: str
    lr: float
    betas: tuple[float, float] = (0.9, 0.99)


@dataclasses.dataclass
class Loud:
    value: int

    def __post_init__(self) -> None:
        raise AssertionError("a checkpoint made the loader run __post_init__")


MINE = DecodeRules(allowed_class_names([Color, Level, Optim, f"{__name__}:Loud", f"{__name__}:Hashy"]))


def roundtrip(tree, rules: DecodeRules = MINE):
    f = encode(tree)
    buf = torch.frombuffer(bytearray(b"".join(bytes(c) for c in f.chunks())), dtype=torch.uint8)
    return decode(buf, where="test.ert", rules=rules)


def header_of(tree) -> dict:
    """The safetensors header of ``tree``'s data file, its elastic-resume metadata parsed."""
    f = encode(tree)
    raw = b"".join(bytes(c) for c in f.chunks())
    hlen = int.from_bytes(raw[:8], "little")
    header = _parse_header(raw[8:8 + hlen], "test.safetensors")
    return dict(header, __metadata__=json.loads(header["__metadata__"]["elastic_resume"]))


def test_config_values_round_trip_with_their_types():
    cfg = OmegaConf.create({"model": {"hidden": 32, "width": "${model.hidden}"}, "tags": ["a", "b"]})
    tree = {
        "path": pathlib.Path("/data/train"), "posix": pathlib.PurePosixPath("a/b"), "win": pathlib.PureWindowsPath(r"C:\x"),
        "color": Color.BLUE, "level": Level.HIGH, "set": {3, 1, 2}, "frozen": frozenset({"x"}),
        "when": dt.datetime(2026, 12, 2, 9, 30, tzinfo=dt.timezone(dt.timedelta(hours=1))), "day": dt.date(2026, 1, 2),
        "at": dt.time(8, 15, 1), "span": dt.timedelta(days=2, seconds=5, microseconds=7),
        "args": argparse.Namespace(lr=0.1, inner=argparse.Namespace(depth=3, path=pathlib.Path("x"))),
        "optim": Optim("adam", 1e-3), "cfg": cfg, "cfg_list": OmegaConf.create([1, 2]), "cfg_type": DictConfig,
    }
    back = roundtrip(tree)
    plain = [k for k in tree if k not in ("cfg", "cfg_list")]
    assert {k: back[k] for k in plain} == {k: tree[k] for k in plain}
    assert type(back["path"]) is type(tree["path"]) and type(back["win"]) is pathlib.PureWindowsPath
    assert back["color"] is Color.BLUE and back["level"] is Level.HIGH
    assert isinstance(back["frozen"], frozenset) and back["when"].utcoffset() == dt.timedelta(hours=1)
    assert back["args"].inner.path == pathlib.Path("x") and back["optim"] == Optim("adam", 1e-3)
    assert isinstance(back["cfg"], DictConfig) and back["cfg"].model.width == 32  # the interpolation still resolves
    assert OmegaConf.to_container(back["cfg"]) == OmegaConf.to_container(cfg)
    assert isinstance(back["cfg_list"], ListConfig) and back["cfg_type"] is DictConfig
    assert encodable(tree, "tree")


def test_equal_sets_save_equal_bytes():
    assert json.dumps(header_of({"s": {"b", "a", "c"}})) == json.dumps(header_of({"s": {"c", "b", "a"}}))


def test_code_is_refused_at_save():
    import functools

    with pytest.raises(StateError, match=r"state\['f'\].*functools.partial cannot be checkpointed"):
        encode({"f": functools.partial(print, "x")})
    assert not encodable(print, "f") and not encodable(object(), "o")


def hostile(tree_node) -> bytes:
    """A data file whose header holds ``tree_node`` (digest-valid: written by us)."""
    header = json.dumps({"version": 1, "tree": tree_node, "tensors": []}).encode()
    return b"ERCKPT\x00\x01" + len(header).to_bytes(8, "little") + header


def load(raw: bytes, rules: DecodeRules = MINE):
    padded = raw + b"\x00" * (-len(raw) % 64)
    return decode(torch.frombuffer(bytearray(padded), dtype=torch.uint8), where="evil.ert", rules=rules)


def test_a_hostile_header_cannot_name_code_or_unimported_classes(caplog):
    for node, message in [
        ({"type": "subprocess:Popen"}, "type 'subprocess:Popen' is not one a checkpoint may name"),
        ({"path": ["Popen", "/x"]}, "bad path node"),
        ({"timedelta": [1, "2", 3]}, "bad timedelta node"),
        ({"datetime": "x" * 100}, "bad datetime node"),
        ({"datetime": "not a date"}, "ValueError"),
        ({"ns": [[1, 2]]}, "attribute list"),
        ({"set": [[1]]}, "unhashable"),
    ]:
        with pytest.raises(CheckpointCorruptError, match=message):
            load(hostile({"d": [["x", node]]}))
    with caplog.at_level(logging.WARNING, logger="elastic_resume"):
        # A module that is not imported is never imported: plain values come back, with a warning.
        assert load(hostile({"enum": ["no_such_module_xyz:Color", "RED", "red"]})) == "red"
        assert load(hostile({"dc": ["no_such_module_xyz:Cfg", [["a", 1]]]})) == {"a": 1}
        # An imported dataclass is rebuilt field by field: its __post_init__ does not run.
        loud = load(hostile({"dc": [f"{__name__}:Loud", [["value", 5]]]}))
        assert isinstance(loud, Loud) and loud.value == 5
        # Dunder paths cannot walk to other objects.
        assert load(hostile({"enum": [f"{__name__}:Color.__class__", "RED", "red"]})) == "red"
    assert "no_such_module_xyz:Color is not in allowed_classes" in caplog.text


calls: list[str] = []


@dataclasses.dataclass(frozen=True)
class Hashy:
    value: int

    def __hash__(self) -> int:
        calls.append("hash")
        return self.value

    def __eq__(self, other: object) -> bool:
        calls.append("eq")
        return isinstance(other, Hashy) and other.value == self.value


NOBODY = DecodeRules()  # no class allowlisted: what a checkpoint gets by default


def test_nothing_in_a_file_chooses_code_to_run_unless_the_user_allowlisted_the_class(caplog):
    import sys
    import types

    # Classes the program imported but the user did not allowlist come back plain, and none of
    # their code runs: no __post_init__, no __hash__/__eq__ while building a set.
    calls.clear()
    with caplog.at_level(logging.WARNING, logger="elastic_resume"):
        assert load(hostile({"dc": [f"{__name__}:Loud", [["value", 5]]]}), NOBODY) == {"value": 5}
        assert load(hostile({"enum": [f"{__name__}:Color", "RED", "red"]}), NOBODY) == "red"
        assert load(hostile({"set": [{"dc": [f"{__name__}:Hashy", [["value", 1]]]}]}), NOBODY) == [{"value": 1}]
    assert calls == []
    assert "not in allowed_classes" in caplog.text
    # Allowlisted, the same set is rebuilt with the user's own class.
    assert load(hostile({"set": [{"dc": [f"{__name__}:Hashy", [["value", 1]]]}]})) == {Hashy(1)}
    # Names are resolved without running hooks: a module __getattr__ is never called, even for
    # an allowlisted name; an unlisted name is never looked up at all.
    calls.clear()
    hooked = types.ModuleType("er_hooked_module")
    hooked.__getattr__ = lambda name: calls.append(f"getattr {name}") or Color  # type: ignore[attr-defined]
    sys.modules["er_hooked_module"] = hooked
    try:
        rules = DecodeRules(frozenset({"er_hooked_module:Color"}))
        assert load(hostile({"enum": ["er_hooked_module:Color", "RED", "red"]}), rules) == "red"
        assert load(hostile({"enum": ["er_hooked_module:Other", "RED", "red"]}), NOBODY) == "red"
    finally:
        del sys.modules["er_hooked_module"]
    assert calls == []


def test_a_class_name_behind_a_lazy_import_hook_imports_nothing():
    import subprocess
    import sys

    # torch's module __getattr__ imports torch._dynamo (hundreds of modules) on first access.
    code = f"""
import sys, torch, json
from elastic_resume.checkpoint.values import DecodeRules
sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})
from test_values import hostile, load
before = len(sys.modules)
rules = DecodeRules(frozenset({{"torch:_dynamo.source.LocalSource"}}))
print(json.dumps([load(hostile({{"dc": ["torch:_dynamo.source.LocalSource", [["local_name", "x"]]]}}), rules),
                  "torch._dynamo" in sys.modules, len(sys.modules) - before]))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    value, dynamo, new_modules = json.loads(r.stdout.strip().splitlines()[-1])
    assert value == {"local_name": "x"} and dynamo is False and new_modules < 5


def test_omegaconf_resolvers_in_a_file_never_resolve_in_the_loading_process(monkeypatch):
    monkeypatch.setenv("ER_TEST_SECRET", "hunter2-secret")
    cfg = OmegaConf.create({"key": "${oc.env:ER_TEST_SECRET}", "dim": 4, "width": "${dim}",
                            "mixed": "s3://${oc.env:ER_TEST_SECRET}/${dim}", "escaped": "\\${dim}"})
    back = roundtrip({"cfg": cfg})["cfg"]
    assert back.key == "${oc.env:ER_TEST_SECRET}" and back.mixed == "s3://${oc.env:ER_TEST_SECRET}/${dim}"
    assert back.width == 4 and back.escaped == "${dim}"  # the config's own references still resolve
    assert "hunter2" not in json.dumps(OmegaConf.to_container(back, resolve=True))
    # Text OmegaConf cannot parse is corruption, never an exception of omegaconf's own.
    with pytest.raises(CheckpointCorruptError, match="does not parse"):
        load(hostile({"omc": {"d": [["a", "${unclosed"]]}}))


def test_a_dict_keyed_by_a_class_not_allowlisted_names_the_option():
    node = {"d": [[{"dc": [f"{__name__}:Hashy", [["value", 1]]]}, 5]]}
    with pytest.raises(CheckpointCorruptError, match="class not in allowed_classes"):
        load(hostile(node), NOBODY)
    assert load(hostile(node)) == {Hashy(1): 5}
