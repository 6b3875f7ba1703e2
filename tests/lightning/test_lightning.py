"""PyTorch Lightning through ``elastic-resume launch``: real Lightning, DDP over gloo on CPU, two
worker processes, ``launch/train_lightning.py`` (ModelCheckpoint + ElasticCheckpointIO +
ElasticResume + ResumableDataLoader, a model with dropout). Every loss is compared bit for bit
with one uninterrupted run of the same script.

Every test runs twice: with only ``pytorch_lightning`` importable (the classic spelling, the
``pytorch-lightning`` distribution) and with only ``lightning.pytorch``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

pytest.importorskip("lightning", reason="the Lightning integration needs the 'lightning' extra")

from elastic_resume.events import read_events
from harness.processes import REPO
from harness.s3 import S3_ENV, make_bucket
from tests.helpers.launcher import launcher_cmd, losses, run, start, stop, wait_event
from tests.helpers.lightning_namespaces import only

SCRIPT = os.path.join(REPO, "launch", "train_lightning.py")
STEPS = 30  # 16 optimizer steps per epoch: a run crosses two epoch boundaries


def launch(tmp_path, *args: str, root: str | None = None, nproc: int = 2) -> list[str]:
    return launcher_cmd(
        "--standalone", f"--nproc-per-node={nproc}", f"--er-event-log={tmp_path / 'events.jsonl'}",
        script=SCRIPT,
        args=("--root", root or str(tmp_path / "ckpt"), "--fault-dir", str(tmp_path),
              "--loss-log", str(tmp_path / "loss.jsonl"), "--detector-window", "20", *args),
    )


def last_losses(path) -> dict[tuple[int, int], float]:
    """(rank, step) -> the loss of the surviving timeline (a redone step replaces the first try)."""
    return {k: v[-1] for k, v in losses(str(path)).items()}


def events(tmp_path, name: str) -> list[dict]:
    return [e for e in read_events(str(tmp_path / "events.jsonl")) if e["event"] == name]


def bundles(tmp_path) -> list[str]:
    return sorted(n for n in os.listdir(tmp_path / "ckpt") if n.endswith(".ckpt"))  # not resume-attempts.json


@pytest.fixture(scope="module", params=["pytorch_lightning", "lightning"])
def namespace(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def ns_env(namespace) -> dict[str, str]:
    """The environment in which only this namespace imports."""
    return only(namespace)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, namespace, ns_env) -> dict[tuple[int, int], float]:
    """Losses of one uninterrupted 2-process run, per (rank, step)."""
    ref = tmp_path_factory.mktemp("lightning-ref")
    r = run(launch(ref, "--steps", str(STEPS)), env=ns_env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"lightning namespace: {'lightning.pytorch' if namespace == 'lightning' else namespace} " in r.stdout
    got = last_losses(ref / "loss.jsonl")
    assert sorted({s for _, s in got}) == list(range(1, STEPS + 1))
    return got


@pytest.mark.slow
def test_killed_worker_resumes_mid_epoch_with_identical_losses(tmp_path, reference, ns_env):
    r = run(launch(tmp_path, "--steps", str(STEPS), "--die-at-steps", "12"), env=ns_env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    restored = events(tmp_path, "restored")
    # Step 12 is mid-epoch (16 steps per epoch): both ranks resume from the checkpoint of step 10.
    assert sorted((e["rank"], e["step"]) for e in restored) == [(0, 10), (1, 10)]
    assert all(e["path"].endswith("epoch=0-step=10.ckpt") for e in restored)
    assert len(events(tmp_path, "workers_started")) == 2
    assert last_losses(tmp_path / "loss.jsonl") == reference
    assert bundles(tmp_path) == sorted(f"epoch={(s - 1) // 16}-step={s}.ckpt" for s in range(5, STEPS + 1, 5))
    # The steps after 10 that ran before the kill ran again with the same losses, and the run says so.
    verified = events(tmp_path, "replay_verified")
    assert len(verified) == 1 and verified[0]["from_step"] == 11 and verified[0]["steps"] >= 1, verified
    assert not events(tmp_path, "replay_mismatch")


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back_and_says_so(tmp_path, reference, ns_env):
    r = run(launch(tmp_path, "--steps", "20"), env=ns_env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    newest = tmp_path / "ckpt" / "epoch=1-step=20.ckpt"
    assert newest.is_file()
    with open(newest, "r+b") as f:  # one flipped byte in the middle of the file
        f.seek(os.path.getsize(newest) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    r = run(launch(tmp_path, "--steps", "25"), env=ns_env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "resuming from" in out and "epoch=0-step=15.ckpt (step 15) instead of" in out and "digest mismatch" in out
    # Lightning's own line names the checkpoint loaded, not the corrupt one resume_path chose.
    assert "Restored all states from the checkpoint at" in out
    assert all(line.rstrip().endswith("epoch=0-step=15.ckpt") for line in out.splitlines() if "Restored all states" in line)
    corrupt = events(tmp_path, "corruption_found")
    assert {e["rank"] for e in corrupt} == {0, 1} and all(e["step"] == 20 for e in corrupt)
    assert sorted((e["rank"], e["step"]) for e in events(tmp_path, "restored")) == [(0, 15), (1, 15)]
    # The corrupt checkpoint stays for inspection; the redone step 20 is saved beside it.
    assert "epoch=1-step=20.ckpt" in bundles(tmp_path) and "epoch=1-step=20-v1.ckpt" in bundles(tmp_path)
    # The commands agree on the directory: the run's world size (2, not the one writer), a step
    # of a file inspected, corruption labelled once the data is read.
    cli = [sys.executable, "-m", "elastic_resume.cli"]
    ls = subprocess.run([*cli, "ls", str(tmp_path / "ckpt")], capture_output=True, text=True).stdout
    rows = {line.split()[0]: line.split() for line in ls.splitlines() if line.startswith("epoch=")}
    assert rows["epoch=0-step=15.ckpt"][1:5] == ["15", "committed", rows["epoch=0-step=15.ckpt"][3], "2"]
    assert "no data was read" in ls
    full = subprocess.run([*cli, "ls", "--full", str(tmp_path / "ckpt")], capture_output=True, text=True).stdout
    assert any(line.startswith("epoch=1-step=20.ckpt ") and " corrupt " in line for line in full.splitlines())
    shown = subprocess.run([*cli, "inspect", str(tmp_path / "ckpt"), "15"], capture_output=True, text=True)
    assert shown.returncode == 0 and "file        epoch=0-step=15.ckpt" in shown.stdout
    assert "world size  2 (written by 1)" in shown.stdout
    got = last_losses(tmp_path / "loss.jsonl")
    assert {k: v for k, v in got.items()} == {k: v for k, v in reference.items() if k[1] <= 25}


@pytest.mark.slow
def test_spike_on_one_rank_rolls_back_both_in_process(tmp_path, reference, ns_env):
    r = run(launch(tmp_path, "--steps", str(STEPS), "--spike-at-step", "20", "--spike-rank", "1",
                   "--margin", "3", "--skip-after", "3", "--lr-scale", "0.5"), env=ns_env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rollbacks = events(tmp_path, "rollback")
    assert sorted(e["rank"] for e in rollbacks) == [0, 1]
    assert {(e["from_step"], e["to_step"], tuple(e["skipped"]), e["lr_scale"]) for e in rollbacks} == {(20, 15, (240, 368), 0.5)}
    detected = events(tmp_path, "spike_detected")
    # One rank's loss spiked; the mean over both moved, and both judged it the same.
    assert sorted((e["rank"], e["step"], e["judged"]) for e in detected) == [(0, 20, "global"), (1, 20, "global")]
    assert len(events(tmp_path, "workers_started")) == 1  # no process restarted
    assert [e["step"] for e in events(tmp_path, "checkpoint_retired")] == [20]
    got = losses(str(tmp_path / "loss.jsonl"))
    # Up to the anchor nothing differs; steps 16-20 ran twice, then training went on to the end.
    assert all(got[k][0] == v for k, v in reference.items() if k[1] <= 19)
    assert all(len(got[(rank, s)]) == 2 for rank in (0, 1) for s in range(16, 21))
    assert max(s for _, s in got) == STEPS
    assert all(v[-1] < 10 for v in got.values())  # the spike is gone from the surviving timeline
    # The anchor was re-committed with the recovery state: a requeue would not redo the rollback.
    assert "epoch=0-step=15.ckpt" in bundles(tmp_path)


@pytest.mark.slow
def test_replicas_that_diverge_are_never_checkpointed_and_the_run_ends_on_the_uninterrupted_losses(
        tmp_path, reference, ns_env):
    r = run(launch(tmp_path, "--steps", str(STEPS), "--nudge-param-at-step", "12", "--spike-rank", "1"), env=ns_env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    found = events(tmp_path, "replica_divergence")
    # Lightning writes rank 0's copy alone: every rank compares digests before the save of step 15.
    assert {(e["rank"], e["step"], e["found_by"]) for e in found} == {(0, 15, "save"), (1, 15, "save")}
    assert all(e["ranks"] == [0, 1] and e["parameters"] == ["model.net.0.weight"] for e in found)  # two: both named
    assert "epoch=0-step=15.ckpt" not in [e.get("path", "").rsplit("/", 1)[-1] for e in events(tmp_path, "restored")]
    assert sorted(e["step"] for e in events(tmp_path, "restored")) == [10, 10]  # the newest agreeing step
    assert last_losses(tmp_path / "loss.jsonl") == reference


@pytest.mark.slow
def test_sigusr1_saves_exits_75_and_the_requeued_run_continues(tmp_path, reference, ns_env):
    # Async saves: the preemption save must still be committed before the workers exit.
    cmd = launch(tmp_path, "--steps", str(STEPS), "--step-seconds", "0.15", "--async-save")
    proc = start(cmd, str(tmp_path / "launch.log"), env=ns_env)
    try:
        wait_event(str(tmp_path / "events.jsonl"), lambda e: e["event"] == "step" and e["step"] >= 7, proc=proc)
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(timeout=120) == 75, (tmp_path / "launch.log").read_text()[-3000:]
    finally:
        stop(proc)
    saves = events(tmp_path, "preemption_save")
    assert sorted(e["rank"] for e in saves) == [0, 1] and len({e["step"] for e in saves}) == 1
    saved = saves[0]["step"]
    assert f"preempted-epoch=0-step={saved}.ckpt" in bundles(tmp_path)
    r = run(launch(tmp_path, "--steps", str(STEPS)), env=ns_env)  # the requeued job
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted((e["rank"], e["step"]) for e in events(tmp_path, "restored")) == [(0, saved), (1, saved)]
    assert last_losses(tmp_path / "loss.jsonl") == reference


@pytest.mark.slow
@pytest.mark.s3
def test_checkpoints_on_s3_survive_a_killed_worker(tmp_path, reference, ns_env, s3_endpoint):
    import s3fs

    bucket = make_bucket(s3_endpoint)
    env = dict(ns_env, **S3_ENV, AWS_ENDPOINT_URL=s3_endpoint)
    r = run(launch(tmp_path, "--steps", "20", "--die-at-steps", "12", "--save-last", "--async-save",
                   root=f"s3://{bucket}/run"), env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted((e["rank"], e["step"]) for e in events(tmp_path, "restored")) == [(0, 10), (1, 10)]
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/run"))
    assert names == ["epoch=0-step=10.ckpt", "epoch=0-step=15.ckpt", "epoch=0-step=5.ckpt", "epoch=1-step=20.ckpt",
                     "last.ckpt", "resume-attempts.json"]
    # last.ckpt was rewritten at every save (one PUT each): a file holding the newest step.
    assert fs.isfile(f"{bucket}/run/last.ckpt")
    with fs.open(f"{bucket}/run/last.ckpt", "rb") as f:
        assert __import__("torch").load(f, weights_only=True)["global_step"] == 20
    got = last_losses(tmp_path / "loss.jsonl")
    assert got == {k: v for k, v in reference.items() if k[1] <= 20}


@pytest.mark.slow
def test_three_ranks_resume_bit_for_bit_once_ddp_is_settled(tmp_path, ns_env):
    """DDP re-orders its gradient sums after the first backward, which shows at 3+ ranks; the
    callback settles it from the module's example_input_array in every run alike."""
    common = ("--steps", "16", "--dataset-size", "384")
    (tmp_path / "ref").mkdir()
    r = run(launch(tmp_path / "ref", *common, nproc=3), env=ns_env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = run(launch(tmp_path, *common, "--die-at-steps", "12", nproc=3), env=ns_env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(e["step"] for e in events(tmp_path, "restored")) == [10, 10, 10]
    assert last_losses(tmp_path / "loss.jsonl") == last_losses(tmp_path / "ref" / "loss.jsonl")


@pytest.mark.slow
def test_gave_up_out_of_fit_exits_76_and_is_not_restarted(tmp_path, ns_env):
    """The example script has no try/except for GaveUpError: the worker maps it to 76."""
    r = run(launch(tmp_path, "--steps", "20", "--spike-at-step", "17", "--budget", "0"), env=ns_env)
    assert r.returncode == 76, r.stdout[-3000:] + r.stderr[-3000:]
    assert len(events(tmp_path, "workers_started")) == 1
    assert "elastic-resume: gave up:" in r.stdout + r.stderr and "budget" in r.stdout + r.stderr


@pytest.mark.slow
def test_a_spike_in_the_first_micro_batch_of_an_accumulated_step_is_rolled_back(tmp_path, ns_env):
    # accumulate_grad_batches=2: step 12's first micro-batch spikes on rank 1, its second does
    # not; the step's loss is the mean of both, so the spike counts.
    r = run(launch(tmp_path, "--steps", "16", "--accumulate", "2", "--spike-at-step", "12", "--margin", "3"), env=ns_env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert {(e["from_step"], e["to_step"]) for e in events(tmp_path, "rollback")} == {(12, 5)}
    assert {(e["rank"], e["step"]) for e in events(tmp_path, "spike_detected")} == {(0, 12), (1, 12)}


@pytest.mark.slow
def test_plateau_rolls_back_at_each_lower_lr_until_it_ends_or_the_budget_is_spent(tmp_path, ns_env):
    plateau = ("--plateau-after", "10", "--plateau-window", "4", "--lr-scale", "0.5", "--margin", "3")
    never = tmp_path / "never"  # the loss never drops below 0
    never.mkdir()
    r = run(launch(never, "--steps", str(STEPS), "--plateau-above", "0", "--budget", "2", *plateau), env=ns_env)
    assert r.returncode == 76, r.stdout[-3000:] + r.stderr[-3000:]
    rollbacks = [e for e in events(never, "rollback") if e["rank"] == 0]
    # Fired 10 steps after the start, then 10 steps after the anchor at the new LR.
    assert [(e["from_step"], e["to_step"], e["skipped"]) for e in rollbacks] == [(10, 5, None), (15, 10, None)]
    gave_up = events(never, "gave_up")
    assert "plateau at step 20" in gave_up[0]["reason"] and "budget of 2 is spent" in gave_up[0]["reason"]
    assert len(events(never, "workers_started")) == 1  # 76: not restarted
    ends = tmp_path / "ends"  # high while the LR is above 0.03; one rollback at LR x0.5 ends it
    ends.mkdir()
    r = run(launch(ends, "--steps", str(STEPS), "--plateau-above", "5", "--high-loss-while-lr-above", "0.03",
                   *plateau), env=ns_env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert [(e["from_step"], e["to_step"]) for e in events(ends, "rollback") if e["rank"] == 0] == [(10, 5)]
    got = last_losses(ends / "loss.jsonl")
    assert max(s for _, s in got) == STEPS and all(v < 5 for (_, s), v in got.items() if s > 5)


OLDEST_DIR = os.path.join(REPO, ".venv", "overlays", "pytorch-lightning-2.5")


@pytest.mark.slow
def test_oldest_supported_release_resumes_bit_for_bit_and_rolls_back(tmp_path):
    """pytorch-lightning 2.5.6 (the oldest release of the supported range; `make install` puts
    it in an overlay) through the same internals: a mid-epoch kill resumes with every loss equal
    to an uninterrupted run, and a spike rolls back in-process."""
    if not os.path.isdir(OLDEST_DIR):
        if os.environ.get("CI"):
            pytest.fail(f"{OLDEST_DIR} is missing: `make install` installs the oldest supported Lightning there")
        pytest.skip("the oldest supported Lightning is not installed (make install)")
    env = only("pytorch_lightning")
    env["PYTHONPATH"] = OLDEST_DIR + os.pathsep + env["PYTHONPATH"]
    (tmp_path / "ref").mkdir()
    r = run(launch(tmp_path / "ref", "--steps", "20"), env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "lightning namespace: pytorch_lightning 2.5.6" in r.stdout
    reference = last_losses(tmp_path / "ref" / "loss.jsonl")
    (tmp_path / "kill").mkdir()
    r = run(launch(tmp_path / "kill", "--steps", "20", "--die-at-steps", "12"), env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted((e["rank"], e["step"]) for e in events(tmp_path / "kill", "restored")) == [(0, 10), (1, 10)]
    assert last_losses(tmp_path / "kill" / "loss.jsonl") == reference
    (tmp_path / "spike").mkdir()
    r = run(launch(tmp_path / "spike", "--steps", "20", "--spike-at-step", "17", "--margin", "1"), env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert {(e["from_step"], e["to_step"]) for e in events(tmp_path / "spike", "rollback")} == {(17, 15)}
    got = last_losses(tmp_path / "spike" / "loss.jsonl")
    assert max(s for _, s in got) == 20 and all(v < 10 for v in got.values())


@pytest.mark.slow
def test_a_crash_between_a_rollbacks_decision_and_its_commit_is_finished_at_the_next_start(tmp_path, ns_env):
    """A one-off spike at step 17, and rank 1 SIGKILLed right after the anchor was loaded: the
    restarted run resumes from the newest checkpoint, finds the decision recorded before the
    crash, and carries out that rollback (the spike does not recur by itself)."""
    r = run(launch(tmp_path, "--steps", "30", "--spike-at-step", "17", "--die-in-rollback"), env=ns_env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    resumed = events(tmp_path, "rollback_resumed")
    assert {e["rank"] for e in resumed} == {0, 1} and {e["onset"] for e in resumed} == {17}
    after = [e for e in events(tmp_path, "rollback") if e["rank"] == 0]
    assert len(after) == 1 and after[0]["from_step"] == 17 and after[0]["rollbacks"] == 1
    assert after[0]["skipped"] is not None
    assert len(events(tmp_path, "workers_started")) == 2


def test_a_bundle_written_by_0_2_0_still_resumes(tmp_path, namespace, ns_env):
    """Data files in the .ert framing of 0.1-0.5 stay loadable after the move to safetensors."""
    import shutil

    bundle = tmp_path / "epoch=0-step=4.ckpt"
    shutil.copytree(os.path.join(REPO, "tests", "fixtures", "written-by-0.2.0", "epoch=0-step=4.ckpt"), bundle)
    r = subprocess.run([sys.executable, os.path.join(REPO, "tests", "helpers", "resume_old_bundle.py"), str(bundle),
                        namespace], capture_output=True, text=True, timeout=120, env=dict(os.environ, **ns_env))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "weights from the bundle: True" in r.stdout and "resumed at step 4 ended at 8" in r.stdout, r.stdout


def test_best_model_path_is_one_file_lightnings_own_loaders_open_and_a_flipped_byte_falls_back(tmp_path, namespace,
                                                                                                  ns_env):
    """The two lines Lightning users write most, on what the plugin saved, locally and from an
    http URL; then a flipped byte in the newest file: the resume loads the one before, and
    ``verify`` names the file."""
    helper = os.path.join(REPO, "tests", "helpers", "single_file_lightning.py")
    ckpt = tmp_path / "ckpt"
    env = dict(os.environ, **ns_env, TORCH_HOME=str(tmp_path / "torch-home"))

    def script(mode: str) -> str:
        r = subprocess.run([sys.executable, helper, str(ckpt), namespace, mode], capture_output=True, text=True,
                           timeout=300, env=env)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r.stdout + r.stderr

    out = script("train")
    assert "best is a file: True" in out and "best loads: True step 6 lr 0.05" in out, out
    assert "last loads: step 6" in out and "url loads: True" in out, out
    assert "started at step 6" in out and "url resumed: ended at 8" in out, out  # fit(ckpt_path=url), verified
    assert sorted(os.listdir(ckpt)) == ["epoch=0-step=4.ckpt", "epoch=0-step=6.ckpt", "last.ckpt"]
    with open(ckpt / "last.ckpt", "r+b") as f:  # the newest: what a resume picks
        f.seek(os.path.getsize(ckpt / "last.ckpt") // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))
    verify = subprocess.run([sys.executable, "-m", "elastic_resume.cli", "verify", str(ckpt)], capture_output=True,
                            text=True, env=env)
    assert verify.returncode == 1, verify.stdout + verify.stderr
    assert "last.ckpt step 8: CORRUPT" in verify.stdout and "last.ckpt: digest mismatch" in verify.stdout
    assert "epoch=0-step=6.ckpt step 6: OK" in verify.stdout
    out = script("resume")
    assert f"resuming from {ckpt / 'epoch=0-step=6.ckpt'} (step 6) instead of {ckpt / 'last.ckpt'}" in out, out
    assert "started at step 6" in out and "ended at 10" in out, out
