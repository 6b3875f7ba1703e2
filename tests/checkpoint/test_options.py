"""Configuration: ``CheckpointOptions`` and ``GuardOptions`` taken as one object or as keyword
settings, bad values named in one line, and the library versions of the drift fingerprint read
once per process (not at every save)."""

from __future__ import annotations

import pytest
import torch

from elastic_resume import CheckpointManager, CheckpointOptions, GuardOptions, SpikeGuard
from elastic_resume.checkpoint import fingerprint
from elastic_resume.collectives import LocalGroup
from elastic_resume.errors import ConfigError


def test_options_as_one_object_or_as_keywords_configure_the_same_manager(tmp_path):
    a = CheckpointManager(tmp_path / "a", CheckpointOptions(keep_last=5, drift="fail"), group=LocalGroup())
    b = CheckpointManager(tmp_path / "b", keep_last=5, drift="fail", group=LocalGroup())
    assert a.options == b.options
    with pytest.raises(ConfigError, match=r"pass CheckpointOptions or keyword settings, not both .*keep_last"):
        CheckpointManager(tmp_path / "c", CheckpointOptions(), keep_last=2)


@pytest.mark.parametrize("settings, expect", [
    ({"keep_last": 0}, "keep_last must be a positive integer or None"),
    ({"keep_every": True}, "keep_every must be a positive integer or None"),
    ({"drift": "sometimes"}, r"CheckpointManager\(drift=...\) must be one of warn, fail, ignore"),
    ({"drift_allow": "versions.*"}, "drift_allow must be a list of patterns"),
    ({"collective_timeout_s": 0}, "collective_timeout_s must be positive"),
])
def test_bad_checkpoint_options_are_named(settings, expect):
    with pytest.raises(ConfigError, match=expect):
        CheckpointOptions(**settings)


def test_guard_options_as_one_object_or_as_keywords(tmp_path):
    mgr = CheckpointManager(tmp_path / "ckpt", group=LocalGroup())
    guard = SpikeGuard(mgr, {"w": torch.zeros(2)}, GuardOptions(vote_every=5, judge="rank"), group=None)
    assert guard.vote_every == 5 and guard.judge == "rank"
    with pytest.raises(ConfigError, match=r"SpikeGuard\(judge=...\) must be one of global, rank"):
        SpikeGuard(mgr, {}, judge="everyone", group=None)
    with pytest.raises(ConfigError, match="pass GuardOptions or keyword settings, not both"):
        SpikeGuard(mgr, {}, GuardOptions(), lag=0, group=None)


def test_library_versions_are_read_once_per_process(monkeypatch):
    from importlib import metadata

    calls = []
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda dist: calls.append(dist) or real(dist))
    fingerprint.environment.cache_clear()
    model = torch.nn.Linear(2, 2)
    first = fingerprint.compute({"model": model}, world_size=1)
    assert calls, "the versions were not read at all"
    read = len(calls)
    for _ in range(5):
        assert fingerprint.compute({"model": model}, world_size=1) == first
    assert len(calls) == read
