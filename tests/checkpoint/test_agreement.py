"""The one agreement protocol (``checkpoint/agreement.py``) and the rank-0 helper it is fed by
(``collectives.on_rank0``), in a world of one: candidates tried newest first, each failure
reported with its file and reason, a failing ``finish`` moving on, and none left a clear error.
Several ranks agreeing is exercised under real torchrun in ``test_distributed.py`` and the
Lightning tests; both callers run this same function."""

from __future__ import annotations

import pytest

from elastic_resume.checkpoint.agreement import Candidate, agree
from elastic_resume.checkpoint.reading import ReadAttempt
from elastic_resume.collectives import LocalGroup, on_rank0
from elastic_resume.errors import NoCheckpointError, StorageError
from elastic_resume.events import EventLog, read_events


def test_the_newest_readable_candidate_is_taken_and_the_skipped_ones_are_reported(tmp_path):
    log = tmp_path / "events.jsonl"
    reads = {30: ReadAttempt(None, file="step-30/x.ert", why="digest mismatch"), 20: ReadAttempt("twenty", 7),
             10: ReadAttempt("ten", 9)}
    skipped = []
    agreed = agree(LocalGroup(), [Candidate(30), Candidate(20), Candidate(10)], lambda c: reads[c.step],
                   events=EventLog(log), on_skip=lambda c, a: skipped.append(c.step), nothing=str)
    assert (agreed.candidate, agreed.value) == (Candidate(20), "twenty")
    assert [s.as_dict() for s in agreed.skipped] == [{"step": 30, "file": "step-30/x.ert", "reason": "digest mismatch"}]
    assert skipped == [30]
    events = [(e["event"], e["step"]) for e in read_events(log)]
    assert events == [("corruption_found", 30), ("restore_fallback", 30)]


def test_a_failing_finish_moves_on_and_nothing_left_names_every_file_and_reason(tmp_path):
    candidates = [Candidate(2, "dir/b.ckpt"), Candidate(1, "dir/a.ckpt")]
    with pytest.raises(NoCheckpointError) as e:
        agree(LocalGroup(), candidates, lambda c: ReadAttempt(c.step, 1), events=EventLog(tmp_path / "e.jsonl"),
              finish=lambda c, v: f"shards of {c.path} do not load", nothing=lambda d: f"nothing loads: {d}")
    assert str(e.value) == ("nothing loads: dir/b.ckpt step 2: shards of dir/b.ckpt do not load; "
                            "dir/a.ckpt step 1: shards of dir/a.ckpt do not load")
    found = [e for e in read_events(tmp_path / "e.jsonl") if e["event"] == "corruption_found"]
    assert [(f["step"], f["path"]) for f in found] == [(2, "dir/b.ckpt"), (1, "dir/a.ckpt")]


def test_on_rank0_returns_rank0s_answer_or_raises_the_same_error_naming_what_failed():
    assert on_rank0(LocalGroup(), lambda: [3, 2], error=NoCheckpointError, what="listing") == [3, 2]

    def broken() -> list[int]:
        raise OSError(13, "Permission denied")

    with pytest.raises(StorageError, match=r"^cannot list /x: \[Errno 13\] Permission denied$") as e:
        on_rank0(LocalGroup(), broken, error=lambda m: StorageError(0, m), what="cannot list /x")
    assert isinstance(e.value.__cause__, OSError)  # rank 0 keeps the original for its traceback
