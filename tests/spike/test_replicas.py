"""Silent replica divergence: the digest and its rotation (pure), the vote's declared MIN/MAX
fields, and real three-rank DDP launches where one rank's copy of one parameter element is nudged
after an optimizer step: found (by the vote, or by a save's agreement), the odd rank and the
parameter named, rolled back (or, without the guard, restarted) to the newest committed step, and
the run ends on the uninterrupted run's losses."""

from __future__ import annotations

import pytest
import torch

from elastic_resume import PerRank
from elastic_resume.events import read_events
from elastic_resume.replicas import Rotation, digest, disagreement, odd_ranks, replicated_parameters, state_digests
from elastic_resume.report import summarize
from elastic_resume.spike.guard import GuardOptions
from elastic_resume.spike.policy import RollbackDecision
from elastic_resume.spike.vote import REPLICA_DIGEST_MAX, REPLICA_DIGEST_MIN, Field, Reduce, Vote
from tests.helpers.launcher import launcher_cmd, losses, node_log, run, stop, two_nodes

WORLD = 3
STEPS = 40


def test_one_element_changed_by_the_least_bit_changes_the_digest():
    for dtype in (torch.float32, torch.bfloat16, torch.float64, torch.complex64):
        t = torch.randn(64, 33).to(dtype)
        before = int(digest([t, t.T]).item())
        assert before == int(digest([t.clone(), t.clone().T]).item())  # copies, strided views: the same
        u = t.clone()
        flat = torch.view_as_real(u) if u.is_complex() else u
        as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
        flat.view(as_int)[3, 4] += 1  # the last mantissa bit of one element
        assert int(digest([u, t.T]).item()) != before
        assert 0 <= before < 2**52  # exact in the vote's float64


def test_the_rotation_reads_every_parameter_once_per_round_in_slices_of_about_equal_bytes():
    model = torch.nn.Sequential(*(torch.nn.Linear(64, 64) for _ in range(8)))
    params = replicated_parameters({"model": model})
    rotation = Rotation(params, slices=4)
    seen = [rotation.next().indices for _ in range(len(rotation.slices))]
    assert sorted(i for s in seen for i in s) == list(range(len(params)))  # each once per round
    sizes = [sum(params[i][1].numel() for i in s) for s in seen]
    assert max(sizes) <= 2 * min(sizes)
    assert rotation.next().indices == seen[0]  # and round again


def test_only_the_parameters_every_rank_holds_a_copy_of_are_replicas():
    state = {"model": torch.nn.BatchNorm1d(4), "mine": PerRank(torch.nn.Linear(2, 2)), "step": 3,
             "optimizer": torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)}
    assert [n for n, _ in replicated_parameters(state)] == ["model.weight", "model.bias"]  # no buffers, no PerRank
    assert state_digests(state).names == ("model.weight", "model.bias")


def test_the_odd_rank_is_the_one_outside_the_majority_and_with_two_both_are_named():
    assert odd_ranks([5, 5, 7]) == [2] and odd_ranks([5, 7]) == [0, 1] and odd_ranks([1, 2, 3]) == [0, 1, 2]
    assert odd_ranks([4, 4]) == [] and odd_ranks([1, 1, 2, 2]) == [0, 1, 2, 3]
    found = disagreement([[1, 2, 3], [1, 2, 3], [1, 9, 3], [1, 2, 3]], ["a", "b", "c"])
    assert found is not None and found.ranks == [2] and found.parameters == ["b"]
    assert found.describe(4) == "rank 2 differs from the other 3, in b"
    assert disagreement([[1, 2], [1, 2]], ["a", "b"]) is None


def test_declared_fields_reduce_with_their_own_operation():
    vote = Vote(lag=0)  # a world of one: the reduction is the identity, the packing is what is tested
    mean = Field("step_seconds_sum", Reduce.SUM)
    result = vote.submit(7, values=[(7, 1.5, None)], spike=False, nonfinite=False, preempt=False, stop=False,
                         checks={REPLICA_DIGEST_MIN: torch.tensor(2**52 - 1), REPLICA_DIGEST_MAX: 2.0**52 - 1,
                                 mean: 0.25})
    assert result.checks == {"replica_digest_min": 2**52 - 1, "replica_digest_max": 2**52 - 1, "step_seconds_sum": 0.25}
    assert result.values[0].loss == 1.5 and not result.replicas_disagree
    result = vote.submit(8, values=[(8, 1.0, None)], spike=False, nonfinite=False, preempt=False, stop=False)
    assert result.checks == {} and not result.replicas_disagree


def test_settings_and_recorded_decisions_are_checked():
    with pytest.raises(ValueError, match="replica_check_every"):
        GuardOptions(replica_check_every=-1)
    with pytest.raises(ValueError, match="replica_slices"):
        GuardOptions(replica_slices=0)
    doc = RollbackDecision(onset=5, anchor=3, skip_through_step=None, skip_end=None, reason="r", at_step=6,
                           recovery={"rollbacks": 0, "lr_scale": 1.0, "clip_scale": 1.0, "cooldown_left": 0,
                                     "windows": [], "history": []}, cause="replica_divergence").to_json()
    assert RollbackDecision.from_json(doc).cause == "replica_divergence"
    assert RollbackDecision.from_json({**doc, "cause": "os.system"}) is None  # untrusted: a known cause or nothing
    del doc["cause"]
    assert RollbackDecision.from_json(doc).cause == "spike"  # recorded before causes existed


# -- real launches -----------------------------------------------------------------------------------
def _launch(tmp, *args: str) -> tuple[list[dict], dict[tuple[int, int], list[float]]]:
    tmp.mkdir(exist_ok=True)
    cmd = launcher_cmd("--standalone", f"--nproc-per-node={WORLD}", "--max-restarts=2",
                       f"--er-event-log={tmp / 'events.jsonl'}",
                       args=("--root", str(tmp / "ckpt"), "--fault-dir", str(tmp), "--steps", str(STEPS),
                             "--loss-log", str(tmp / "loss.jsonl"), *args))
    r = run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    return read_events(str(tmp / "events.jsonl")), losses(str(tmp / "loss.jsonl"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The losses of a run with the same flags and no nudge, run once per set of flags."""
    runs: dict[tuple[str, ...], dict[tuple[int, int], float]] = {}

    def losses_of(*args: str) -> dict[tuple[int, int], float]:
        if args not in runs:
            _, got = _launch(tmp_path_factory.mktemp("reference"), *args)
            runs[args] = {key: v[-1] for key, v in got.items()}
        return runs[args]
    return losses_of


def _ends_like(got, reference):
    final = {key: v[-1] for key, v in got.items()}
    assert final == reference  # every rank, every step, bit for bit


NUDGE = ("--nudge-param-at-step", "12", "--nudge-rank", "1")


@pytest.mark.slow
def test_a_divergence_between_saves_is_found_by_the_vote_and_rolled_back(tmp_path, uninterrupted):
    flags = ("--guard", "--save-every", "50", "--restart-from-scratch")
    events, got = _launch(tmp_path, *flags, *NUDGE)
    found = [e for e in events if e["event"] == "replica_divergence" and e["rank"] == 0]
    assert len(found) == 1 and found[0]["found_by"] == "vote" and found[0]["ranks"] == [1]
    assert found[0]["parameters"] == ["model.0.weight"]
    options = GuardOptions()
    assert 12 < found[0]["step"] <= 12 + options.replica_check_every * options.replica_slices
    rollback = [e for e in events if e["event"] == "rollback" and e["rank"] == 0]
    assert [(r["from_step"], r["to_step"]) for r in rollback] == [(found[0]["step"], 0)]
    assert rollback[0]["lr_scale"] == 1.0 and rollback[0]["skipped"] is None  # trained again as it was
    _ends_like(got, uninterrupted(*flags))
    text = summarize(events).text()
    assert "found by the vote: rank 1, in model.0.weight" in text and "replica divergence at step" in text


@pytest.mark.slow
def test_a_save_whose_replicas_disagree_is_never_committed(tmp_path, uninterrupted):
    flags = ("--guard", "--save-every", "5")
    events, got = _launch(tmp_path, *flags, *NUDGE)
    found = [e for e in events if e["event"] == "replica_divergence" and e["rank"] == 0]
    assert [(e["step"], e["found_by"], e["ranks"]) for e in found] == [(15, "save", [1])]
    committed = [e["step"] for e in events if e["event"] == "save_committed" and e["rank"] == 0]
    assert committed.index(10) < len(committed) and 15 in committed  # 15 only once trained again
    first_15 = committed.index(15)
    assert committed[:first_15].count(10) == 2  # 10 re-committed by the rollback, before 15 commits
    assert [(e["from_step"], e["to_step"]) for e in events if e["event"] == "rollback" and e["rank"] == 0] == [(15, 10)]
    _ends_like(got, uninterrupted(*flags))


@pytest.mark.slow
def test_without_the_guard_the_refused_save_restarts_the_job_from_the_last_agreeing_step(tmp_path, uninterrupted):
    flags = ("--save-every", "5")
    events, got = _launch(tmp_path, *flags, *NUDGE)
    found = [e for e in events if e["event"] == "replica_divergence" and e["rank"] == 0]
    assert [(e["step"], e["found_by"]) for e in found] == [(15, "save")]
    restored = [e["step"] for e in events if e["event"] == "restored" and e["rank"] == 0]
    assert restored == [10]
    _ends_like(got, uninterrupted(*flags))


@pytest.mark.slow
def test_with_exclusion_the_odd_ranks_node_leaves_and_the_rest_resume_from_the_last_agreeing_step(tmp_path):
    procs = two_nodes(tmp_path, "1:2", ("--root", str(tmp_path / "ckpt"), "--fault-dir", str(tmp_path), "--steps", "30",
                                        "--save-every", "5", "--guard", "--exclude-diverged", "--loss-log",
                                        str(tmp_path / "loss.jsonl"), "--nudge-param-at-step", "12", "--nudge-rank", "3"))
    try:
        assert procs["b"].wait(timeout=240) == 0, node_log(tmp_path, "b")  # ranks 2 and 3: it left on purpose
        assert procs["a"].wait(timeout=240) == 0, node_log(tmp_path, "a")
    finally:
        for p in procs.values():
            stop(p)
    a, b = read_events(tmp_path / "events-a.jsonl"), read_events(tmp_path / "events-b.jsonl")
    found = [e for e in a if e["event"] == "replica_divergence" and e["rank"] == 0]
    assert [(e["step"], e["ranks"], e["found_by"]) for e in found] == [(15, [3], "save")]  # 3 of 4 agree: named
    assert [e["event"] for e in b if e["event"] in ("node_excluded", "restart")] == ["node_excluded"]
    assert [e["world_size"] for e in a if e["event"] == "workers_started"] == [4, 2]
    assert [e["step"] for e in a if e["event"] == "restored" and e["rank"] == 0] == [10]  # the newest that agreed
    lines = [line for line in (tmp_path / "loss.jsonl").read_text().splitlines() if '"step": 30,' in line]
    assert lines and all('"world": 2' in line for line in lines)
