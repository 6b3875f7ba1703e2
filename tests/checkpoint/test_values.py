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


def roundtrip(tree):
    f = encode(tree)
    buf = torch.frombuffer(bytearray(b"".join(bytes(c) for c in f.chunks())), dtype=torch.uint8)
    return decode(buf, where="test.ert")


def header_of(tree) -> dict:
    f = encode(tree)
    raw = b"".join(bytes(c) for c in f.chunks())
    hlen = int.from_bytes(raw[8:16], "little")
    return _parse_header(raw[16:16 + hlen], "test.ert")


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


def load(raw: bytes):
    padded = raw + b"\x00" * (-len(raw) % 64)
    return decode(torch.frombuffer(bytearray(padded), dtype=torch.uint8), where="evil.ert")


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
    assert "no_such_module_xyz:Color is not imported" in caplog.text
