"""Single-file Lightning checkpoints (``checkpoint/single_file.py``): what torch.save writes, with
an integrity record in the zip comment. Every byte of the file is covered: any flipped byte, a
truncation or appended bytes is an error naming the file, never a load of other data."""

from __future__ import annotations

import enum
import json
import logging
import pathlib
import struct
import zipfile

import pytest
import torch

from elastic_resume.checkpoint import single_file
from elastic_resume.checkpoint.values import DecodeRules
from elastic_resume.errors import CheckpointCorruptError, StateError
from elastic_resume.storage import open_storage


class Mode(enum.Enum):
    FAST = "fast"


def lightning_dict(step: int = 7) -> dict:
    return {"global_step": step, "epoch": 1, "state_dict": {"w": torch.arange(6.0).view(2, 3), "b": torch.zeros(2)},
            "optimizer_states": [{"state": {0: {"momentum_buffer": torch.ones(3)}}, "param_groups": [{"lr": 0.1}]}],
            "loops": {"fit_loop": {"x": (1, 2)}}, "hyper_parameters": {"lr": 0.1, "root": pathlib.Path("/data")}}


def write(tmp_path, checkpoint: dict, name: str = "c.ckpt", **record) -> pathlib.Path:
    fields = {"step": checkpoint["global_step"], "health": {"healthy": True, "loss": 0.5}, "metadata": {"world_size": 2}}
    path = tmp_path / name
    with open(path, "wb") as f:
        _record, size = single_file.write_file(f, single_file.savable(checkpoint), **{**fields, **record})
    assert path.stat().st_size == size
    return path


def load(path: pathlib.Path, allowed: frozenset[str] = frozenset()):
    return single_file.load_verified(open_storage(str(path.parent), {}), path.name, DecodeRules(allowed))


def test_the_file_is_a_torch_archive_any_zip_reader_opens_and_the_plugin_verifies(tmp_path):
    path = write(tmp_path, lightning_dict())
    plain = torch.load(path, weights_only=True)  # Lightning's default loader, unverified
    assert plain["global_step"] == 7 and torch.equal(plain["state_dict"]["w"], torch.arange(6.0).view(2, 3))
    assert plain["hyper_parameters"]["root"] == "/data"  # a path as text: weights_only=True builds no classes
    assert torch.load(path, weights_only=True, mmap=True)["global_step"] == 7
    record = json.loads(zipfile.ZipFile(path).comment)
    assert record["elastic_resume"] == 1 and record["step"] == 7 and record["metadata"] == {"world_size": 2}
    checkpoint, rec = load(path)
    assert rec is not None and rec.step == 7 and rec.world_size == 2 and rec.health_record() == (True, 0.5)
    assert torch.equal(checkpoint["optimizer_states"][0]["state"][0]["momentum_buffer"], torch.ones(3))
    assert checkpoint["loops"]["fit_loop"]["x"] == (1, 2)
    # Listing reads the record from the file's end alone.
    assert single_file.record_of(open_storage(str(tmp_path), {}), "c.ckpt") == rec


def test_every_flipped_byte_truncation_and_append_is_found(tmp_path):
    path = write(tmp_path, lightning_dict())
    good = path.read_bytes()
    storage = open_storage(str(tmp_path), {})
    for at in range(len(good)):
        bad = bytearray(good)
        bad[at] ^= 0x01
        path.write_bytes(bytes(bad))
        with pytest.raises(CheckpointCorruptError, match=r"c\.ckpt"):
            single_file.load_verified(storage, "c.ckpt", DecodeRules())
    for cut in (1, 2, 30, len(good) // 2, len(good) - 1):
        path.write_bytes(good[:cut])
        with pytest.raises(CheckpointCorruptError, match=r"c\.ckpt"):
            single_file.load_verified(storage, "c.ckpt", DecodeRules())
    path.write_bytes(good + b"\0" * 10)
    with pytest.raises(CheckpointCorruptError, match=r"c\.ckpt"):
        single_file.load_verified(storage, "c.ckpt", DecodeRules())


@pytest.mark.parametrize(("change", "why"), [
    (lambda r: r.update(size=r["size"] + 1), "says the archive is"),
    (lambda r: r.update(step=-1), "has step=-1"),
    (lambda r: r.update(step="7"), "has step='7'"),
    (lambda r: r.update(digest=None), "has no digest"),
    (lambda r: r.update(metadata=[1]), "malformed health or metadata"),
    (lambda r: r.update(elastic_resume=2), "has version 2"),
])
def test_a_record_that_lies_is_named_never_trusted(tmp_path, change, why):
    path = write(tmp_path, lightning_dict())
    data = path.read_bytes()
    archive_end = len(data) - len(zipfile.ZipFile(path).comment)
    record = json.loads(data[archive_end:])
    change(record)
    comment = json.dumps(record, separators=(",", ":")).encode()
    path.write_bytes(data[:archive_end - 2] + struct.pack("<H", len(comment)) + comment)
    with pytest.raises(CheckpointCorruptError, match=why):
        load(path)


def test_a_file_without_a_record_is_plain_and_a_foreign_comment_is_corrupt(tmp_path):
    torch.save({"global_step": 3}, tmp_path / "plain.ckpt")  # Lightning's default format
    checkpoint, record = load(tmp_path / "plain.ckpt")
    assert record is None and checkpoint == {"global_step": 3}
    with zipfile.ZipFile(tmp_path / "plain.ckpt", "a") as z:
        z.comment = b"hello"
    with pytest.raises(CheckpointCorruptError, match="not an integrity record"):
        load(tmp_path / "plain.ckpt")


def test_hyperparameters_travel_plain_for_torch_load_and_typed_for_the_plugin(tmp_path, caplog):
    checkpoint = lightning_dict()
    checkpoint["hyper_parameters"].update(mode=Mode.FAST, make=__import__("functools").partial(max, 1))
    with caplog.at_level(logging.WARNING, logger="elastic_resume"):
        path = write(tmp_path, checkpoint)
    assert "['hyper_parameters']['make'] (partial) cannot be saved without pickle" in caplog.text
    plain = torch.load(path, weights_only=True)["hyper_parameters"]
    assert plain["mode"] == "fast" and plain["root"] == "/data"
    allowed = frozenset({f"{Mode.__module__}:{Mode.__qualname__}"})
    typed, _ = load(path, allowed)
    assert typed["hyper_parameters"]["mode"] is Mode.FAST and typed["hyper_parameters"]["root"] == pathlib.Path("/data")
    assert "typed_hparams" not in typed.get("elastic_resume", {})
    untyped, _ = load(path)  # a class not allowed comes back plain: the file chooses nothing
    assert untyped["hyper_parameters"]["mode"] == "fast"


def test_state_with_no_weights_only_form_fails_the_save_naming_it():
    checkpoint = lightning_dict()
    checkpoint["state_dict"]["odd"] = object()
    with pytest.raises(StateError, match=r"\['state_dict'\]\['odd'\] \(object\) cannot be checkpointed"):
        single_file.savable(checkpoint)
