"""Never lose the last good checkpoint: the paths around the integrity core that delete or
replace a step (prune, the crash-loop fallback, a zombie incarnation, a concurrent prune) and
the decoders that read untrusted bytes (manifests, data headers), each reproduced through the
public API or the CLI, on local disk and on the S3 server where the backend matters."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from elastic_resume import CheckpointManager, CommitConflictError, StateError
from elastic_resume.checkpoint.layout import new_attempt_id, step_dir
from elastic_resume.checkpoint.store import CheckpointStore
from elastic_resume.errors import CheckpointSaveError
from elastic_resume.events import read_events
from harness.processes import REPO, child_env
from tests.helpers import tamper

CLI = os.path.join(os.path.dirname(sys.executable), "elastic-resume")


# Root without the capabilities that bypass file permissions: the CLI then meets permission
# errors as any user would (tests run as root here and in CI).
NO_DAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]


def cli(*args: str, env: dict[str, str] | None = None, unprivileged: bool = False) -> subprocess.CompletedProcess[str]:
    cmd = [CLI, *args]
    if unprivileged:
        cmd = [*NO_DAC, *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=child_env(env), timeout=120)


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


def state_of(value: float) -> dict:
    return {"w": torch.full((64,), float(value)), "n": int(value)}


def manager(root, **kw) -> CheckpointManager:
    kw.setdefault("keep_last", None)
    return CheckpointManager(root.url, storage_options=root.storage_options, **kw)


def save_steps(root, steps, **kw) -> CheckpointManager:
    mgr = manager(root, **kw)
    for s in steps:
        mgr.save(s, state_of(s))
    return mgr


def restored_value(root, **kw) -> tuple[int | None, float | None]:
    target = {"w": None, "n": None}
    step = manager(root, **kw).restore(target)
    return step, (None if target["w"] is None else float(target["w"][0]))


def flip_same_size(root, step: int) -> None:
    st = tamper.raw(root.url, root.storage_options)
    rel = tamper.data_files(st, step)[0]
    tamper.flip_byte(st, rel, len(tamper.get(st, rel)) - 8)  # inside the tensor bytes


# -- 1. prune must not delete every loadable checkpoint --------------------------------------
def test_prune_keeps_the_newest_loadable_step_when_the_newest_has_a_flipped_byte(root):
    save_steps(root, (10, 20, 30))
    flip_same_size(root, 30)
    r = cli("latest", root.url, *root.cli_options(), env=root.env)
    assert r.stdout.strip() == "20"
    r = cli("prune", root.url, "--keep", "1", *root.cli_options(), env=root.env)
    assert r.returncode == 0, r.stderr
    store = CheckpointStore(tamper.raw(root.url, root.storage_options))
    assert store.committed_steps() == [30, 20]  # 10 goes; 20 (newest loadable) and 30 (evidence) stay
    assert restored_value(root) == (20, 20.0)


def test_prune_never_leaves_fewer_loadable_steps_than_it_keeps(local_root):
    save_steps(local_root, (10, 20, 30, 40))
    flip_same_size(local_root, 40)
    flip_same_size(local_root, 30)
    plan = CheckpointStore(tamper.raw(local_root.url)).prune(keep_last=2)
    assert plan.delete == []  # deleting 10 would leave one loadable step where two were asked for
    save_steps(local_root, (50,))
    plan = CheckpointStore(tamper.raw(local_root.url)).prune(keep_last=2)
    assert plan.delete == [10]
    reports = {r.step: r.ok for r in CheckpointStore(tamper.raw(local_root.url)).verify_all(full=True)}
    assert reports == {50: True, 40: False, 30: False, 20: True}


# -- 2. the crash-loop fallback can get past the step it dropped ------------------------------
def test_crash_loop_fallback_then_resaving_the_dropped_step_replaces_it(root):
    save_steps(root, (30, 40))
    for _ in range(3):
        assert restored_value(root, max_resumes_per_step=3)[0] == 40
    mgr = manager(root, max_resumes_per_step=3)
    target = {"w": None, "n": None}
    assert mgr.restore(target) == 30  # the fourth resume from 40 falls back
    mgr.save(40, state_of(41))  # the run saves step 40 again: no CommitConflictError
    assert restored_value(root)[1] == 41.0
    assert CheckpointStore(tamper.raw(root.url, root.storage_options)).verify(40).ok


# -- 3. a zombie incarnation never replaces a live run's commit ------------------------------
def test_zombie_cannot_replace_a_step_the_live_run_recommitted(root):
    save_steps(root, (4, 5))
    flip_same_size(root, 5)
    live, zombie = manager(root), manager(root)
    for mgr in (live, zombie):
        assert mgr.restore({"w": None, "n": None}) == 4  # both skip the corrupt step 5
    live.save(5, state_of(555))
    with pytest.raises(CommitConflictError, match="committed again by another run"):
        zombie.save(5, state_of(666))
    assert restored_value(root) == (5, 555.0)
    assert CheckpointStore(tamper.raw(root.url, root.storage_options)).verify(5).ok


def test_replacement_is_compare_and_swap_at_the_storage_level(root):
    """Two replacers holding the same proof: exactly one swap lands, whatever the backend."""
    save_steps(root, (5,))
    st = tamper.raw(root.url, root.storage_options)
    store = CheckpointStore(st)
    old = store.read_manifest(5)
    first, second = (store.read_manifest(5) for _ in range(2))
    first.metadata, second.metadata = {"who": "first"}, {"who": "second"}
    store.commit(first, replace=old.raw_digest)
    with pytest.raises(CommitConflictError):
        store.commit(second, replace=old.raw_digest)
    assert store.read_manifest(5).metadata == {"who": "first"}


# -- 4. a concurrent prune never deletes a save in flight or a commit made meanwhile ----------
def test_prune_spares_an_in_flight_save_older_than_a_corrupt_newest_step(root):
    save_steps(root, (10, 30))
    flip_same_size(root, 30)  # the run fell back to 10 and is now writing step 20
    st = tamper.raw(root.url, root.storage_options)
    tamper.put(st, f"{step_dir(20)}/{new_attempt_id()}/shared-00000.ert", b"being written")
    CheckpointStore(st).prune(keep_last=1)
    assert 20 in CheckpointStore(st).step_dirs()


def test_prune_spares_an_incomplete_save_that_began_after_the_newest_commit(local_root):
    save_steps(local_root, (10, 30))  # loadable; a crash-loop fallback to 10 saves 20 again
    st = tamper.raw(local_root.url)
    time.sleep(1.1)  # attempt ids have one-second resolution
    tamper.put(st, f"{step_dir(20)}/{new_attempt_id()}/shared-00000.ert", b"in flight")
    tamper.put(st, f"{step_dir(25)}/20000101T000000-0123456789/shared-00000.ert", b"died long ago")
    plan = CheckpointStore(st).prune(keep_last=2)
    assert plan.delete_incomplete == [25]
    assert CheckpointStore(st).step_dirs() == [10, 20, 30]


def test_prune_does_not_delete_an_incomplete_directory_committed_while_it_decided(local_root, monkeypatch):
    save_steps(local_root, (30,))
    st = tamper.raw(local_root.url)
    tamper.put(st, f"{step_dir(5)}/old/shared-00000.ert", b"partial")
    store = CheckpointStore(st)
    real_scan = store.scan

    def scan_then_commit():  # the listing prune decides on, then a commit lands before deletion
        listing = real_scan()
        tamper.put(st, f"{step_dir(5)}/MANIFEST.json", b"{}")
        return listing

    monkeypatch.setattr(store, "scan", scan_then_commit)
    plan = store.prune(keep_last=1)
    assert plan.delete_incomplete == []
    assert st.exists(f"{step_dir(5)}/old/shared-00000.ert")


# -- 5 and 6. hostile manifests (checksums recomputed) -----------------------------------------
def test_huge_replicated_tensor_count_is_corruption_not_an_allocation(root):
    save_steps(root, (1, 2))
    st = tamper.raw(root.url, root.storage_options)
    doc = tamper.manifest_doc(st, 2)
    doc["extra"]["replicated_tensors"] = 10**9
    tamper.rewrite_manifest(st, 2, doc)
    assert restored_value(root) == (1, 1.0)
    r = cli("verify", root.url, *root.cli_options(), env=root.env)
    assert r.returncode == 1 and "replicated_tensors" in r.stdout


@pytest.mark.parametrize("how", ["unparseable_depth", "checksummed_depth"])
def test_deeply_nested_manifest_is_corruption_everywhere(root, how):
    save_steps(root, (1, 2))
    st = tamper.raw(root.url, root.storage_options)
    rel = f"{step_dir(2)}/MANIFEST.json"
    if how == "unparseable_depth":
        text = tamper.get(st, rel).decode()
        tamper.put(st, rel, text.replace('"metadata": {}', '"metadata": {"x": ' + "[" * 200000 + "]" * 200000 + "}").encode())
    else:
        doc = tamper.manifest_doc(st, 2)
        nested: list = []
        for _ in range(100):
            nested = [nested]
        doc["metadata"] = {"x": nested}
        tamper.rewrite_manifest(st, 2, doc)
    assert restored_value(root) == (1, 1.0)
    for cmd in (["ls"], ["verify"], ["latest"], ["ls", "--json"], ["inspect", "X", "2"]):
        args = [root.url if a == "X" else a for a in cmd]
        if cmd[0] != "inspect":
            args.insert(1, root.url)
        r = cli(*args, *root.cli_options(), env=root.env)
        assert "Traceback" not in r.stderr, (cmd, r.stderr)
    assert cli("latest", root.url, *root.cli_options(), env=root.env).stdout.strip() == "1"


@pytest.mark.parametrize("created", [float("nan"), 1e300])
def test_manifest_with_an_impossible_creation_time_is_reported_in_one_line(local_root, created):
    save_steps(local_root, (1, 2))
    st = tamper.raw(local_root.url)
    doc = tamper.manifest_doc(st, 2)
    doc["created"] = created
    tamper.rewrite_manifest(st, 2, doc)
    r = cli("inspect", local_root.url, "2")
    assert r.returncode == 1 and "invalid creation time" in one_line_error(r)
    r = cli("ls", local_root.url, "--json")
    rows = json.loads(r.stdout, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    assert {row["step"]: row["status"] for row in rows} == {2: "corrupt", 1: "committed"}


# -- 8. data files with valid digests but hostile headers --------------------------------------
def _meta(h, **changes):
    """The header with its elastic-resume metadata (the tree and the tensor list) changed."""
    meta = dict(h["__metadata__"]["elastic_resume"], **changes)
    return dict(h, __metadata__=dict(h["__metadata__"], elastic_resume=meta))


def _tree(node):
    return {"d": [["skeleton", node], ["tensors", {"d": []}]]}


def _first_tensor(h):
    return next(k for k in h if k != "__metadata__")


def _deeply_nested(h):
    meta = json.dumps(dict(h["__metadata__"]["elastic_resume"], tree=None))
    return dict(h, __metadata__={"elastic_resume": meta.replace('"tree": null', '"tree": ' + "[" * 5000 + "]" * 5000)})


HOSTILE_HEADERS = {
    "tensors_null": lambda h: _meta(h, tensors=None),
    "offset_infinity": lambda h: json.dumps(h).replace('"data_offsets": [0', '"data_offsets": [Infinity', 1),
    "size_2_70": lambda h: _meta(h, tree=_tree({"sz": [2**70]})),
    "bad_base64": lambda h: _meta(h, tree=_tree({"b": "***not base64***"})),
    "unknown_device": lambda h: _meta(h, tree=_tree({"dev": "warp-drive:9"})),
    "deep_nesting": _deeply_nested,
    "tensor_ref_out_of_range": lambda h: _meta(h, tree=_tree({"t": 10**12})),
    "shape_not_list": lambda h: dict(h, **{_first_tensor(h): dict(h[_first_tensor(h)], shape="64")}),
    "omegaconf_malformed": lambda h: _meta(h, tree=_tree({"omc": {"d": [["a", "${unclosed"]]}})),
    # The tensors must cover the data exactly, as safetensors requires.
    "hole_before_a_tensor": lambda h: dict(h, **{_first_tensor(h): dict(
        h[_first_tensor(h)], data_offsets=[o + 4 for o in h[_first_tensor(h)]["data_offsets"]])}),
    "a_tensor_named_twice": lambda h: _meta(h, tensors=[_first_tensor(h)] * 2),
    "no_elastic_resume_metadata": lambda h: dict(h, __metadata__={"format": "pt"}),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_HEADERS))
def test_hostile_header_with_a_valid_digest_is_corruption(root, name):
    save_steps(root, (1, 2))
    st = tamper.raw(root.url, root.storage_options)
    rel = tamper.rewrite_data_header(st, 2, 0, HOSTILE_HEADERS[name])
    assert restored_value(root) == (1, 1.0)
    r = cli("verify", root.url, "--step", "2", *root.cli_options(), env=root.env)
    assert r.returncode == 1 and "CORRUPT" in r.stdout and rel.rsplit("/", 1)[-1] in r.stdout, r.stdout + r.stderr
    assert "Traceback" not in r.stderr


def test_a_step_that_does_not_decode_never_stops_retention(local_root):
    save_steps(local_root, (1, 2))
    st = tamper.raw(local_root.url)
    tamper.rewrite_data_header(st, 2, 0, HOSTILE_HEADERS["omegaconf_malformed"])
    log = os.path.join(local_root.url, "..", "events.jsonl")
    mgr = manager(local_root, keep_last=2, event_log=log)
    mgr.save(3, state_of(3))  # judging step 2 (unloadable) does not fail this prune: kept as evidence
    assert CheckpointStore(st).committed_steps() == [3, 2, 1]
    mgr.save(4, state_of(4))  # and the next one deletes it with the rest
    assert CheckpointStore(st).committed_steps() == [4, 3]
    seen = read_events(log)
    assert not [e for e in seen if e["event"] == "prune_failed"]
    assert [e["step"] for e in seen if e["event"] == "corruption_found"] == [2]


# -- 7. an event log that cannot be written never stops checkpointing --------------------------
def test_unwritable_event_log_costs_one_warning_not_a_save(local_root, caplog):
    caplog.set_level(logging.WARNING, logger="elastic_resume")
    mgr = manager(local_root, event_log="/dev/full")  # every write: ENOSPC
    mgr.save(1, state_of(1))
    mgr.save(2, state_of(2))
    assert manager(local_root, event_log="/dev/full").restore({"w": None, "n": None}) == 2
    warnings = [r for r in caplog.records if "cannot be written" in r.getMessage()]
    assert len(warnings) == 2  # one per log object, not one per event


# -- 9. an async save that fails at interpreter exit fails the process -----------------------
def test_async_save_failing_at_exit_makes_the_process_exit_non_zero(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(f"""
        import errno, torch
        from elastic_resume import CheckpointManager
        from elastic_resume.storage import LocalStorage
        mgr = CheckpointManager({str(tmp_path / 'ckpt')!r})
        def full(self, *a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")
        LocalStorage.write_atomic = full
        mgr.save(1, {{"w": torch.zeros(4)}}, blocking=False)
        print("returned from save")
    """))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=child_env(), timeout=120)
    assert "returned from save" in r.stdout
    assert r.returncode == 1
    assert "background save of checkpoint step 1 failed" in r.stderr
    assert CheckpointStore(tamper.raw(str(tmp_path / "ckpt"))).committed_steps() == []


# -- the lower items ---------------------------------------------------------------------------
def test_disk_full_while_committing_is_a_save_error_not_a_conflict(local_root, monkeypatch):
    from elastic_resume.storage import LocalStorage

    def full(self, rel, data):
        raise OSError(28, "No space left on device")

    mgr = manager(local_root)
    monkeypatch.setattr(LocalStorage, "write_create_only", full)
    with pytest.raises(CheckpointSaveError, match="No space left on device") as info:
        mgr.save(1, state_of(1))
    assert not isinstance(info.value, CommitConflictError)


def test_restore_that_fails_with_state_error_loads_nothing(local_root):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    manager(local_root).save(1, {"model": model, "optimizer": opt, "n": 1})
    fresh = torch.nn.Linear(4, 4)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    other_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)  # wrong parameter count
    target = {"model": fresh, "optimizer": other_opt, "n": None}
    with pytest.raises(StateError, match="nothing was loaded"):
        manager(local_root).restore(target)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    assert target["n"] is None


def test_unreadable_data_file_is_skipped_by_restore_and_reported_by_the_cli(local_root, tmp_path):
    save_steps(local_root, (1, 2))
    st = tamper.raw(local_root.url)
    rel = tamper.data_files(st, 2)[0]
    path = os.path.join(local_root.url, rel)
    os.unlink(path)
    os.mkdir(path)  # reading it fails with EISDIR: unreadable, not damaged bytes
    log = tmp_path / "events.jsonl"
    mgr = manager(local_root, event_log=str(log))
    assert mgr.restore({"w": None, "n": None}) == 1
    found = [e for e in read_events(log) if e["event"] == "corruption_found"]
    assert found and found[0]["file"] and found[0]["file"].endswith(os.path.basename(rel))
    for cmd in ("latest", "verify"):
        r = cli(cmd, local_root.url)
        assert r.returncode in (0, 1) and "Traceback" not in r.stderr
    assert cli("latest", local_root.url).stdout.strip() == "1"
    r = cli("verify", local_root.url)
    assert r.returncode == 1 and os.path.basename(rel) in r.stdout


def test_symlinked_data_file_is_refused_by_verify_and_restore_alike(local_root, tmp_path):
    save_steps(local_root, (1, 2))
    st = tamper.raw(local_root.url)
    path = os.path.join(local_root.url, tamper.data_files(st, 2)[0])
    copy = tmp_path / "elsewhere.ert"
    copy.write_bytes(open(path, "rb").read())
    os.unlink(path)
    os.symlink(copy, path)
    assert restored_value(local_root) == (1, 1.0)
    r = cli("verify", local_root.url, "--step", "2")
    assert r.returncode == 1 and "CORRUPT" in r.stdout


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="drops root's permission-bypass capabilities")


@needs_root
def test_unlistable_committed_step_is_unreadable_and_never_deleted(tmp_path):
    root = str(tmp_path / "ckpt")
    mgr = CheckpointManager(root, keep_last=None)
    for s in (1, 2, 3):
        mgr.save(s, state_of(s))
    os.chmod(os.path.join(root, step_dir(1)), 0)  # nobody may list step 1
    r = cli("ls", root, unprivileged=True)
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split()[1] for line in r.stdout.splitlines()[1:]}
    assert rows["1"] == "corrupt"
    r = cli("prune", root, "--keep", "1", unprivileged=True)
    assert "Traceback" not in r.stderr
    assert "deleted step 1" not in r.stdout
    os.chmod(os.path.join(root, step_dir(1)), 0o755)
    assert CheckpointStore(tamper.raw(root)).committed_steps() == [3, 1]  # 2 went by retention; 1 untouched


@needs_root
def test_prune_on_a_read_only_root_is_one_line(tmp_path):
    root = str(tmp_path / "ckpt")
    save_steps(type("R", (), {"url": root, "storage_options": {}})(), (1, 2))
    os.chmod(root, 0o555)
    try:
        r = cli("prune", root, "--keep", "1", unprivileged=True)
    finally:
        os.chmod(root, 0o755)
    assert r.returncode == 2 and "lock" in one_line_error(r)
    assert CheckpointStore(tamper.raw(root)).committed_steps() == [2, 1]


def test_prune_while_another_holds_the_lock_is_one_line(local_root):
    from filelock import FileLock

    save_steps(local_root, (1, 2))
    with FileLock(os.path.join(local_root.url, ".prune.lock")):
        started = time.monotonic()
        r = cli("prune", local_root.url, "--keep", "1", "--lock-timeout", "1")
    assert r.returncode == 2 and "held by another process" in one_line_error(r)
    assert time.monotonic() - started < 60


def test_report_reads_a_log_with_bytes_that_are_not_utf8(tmp_path):
    log = tmp_path / "run.jsonl"
    good = json.dumps({"ts": 1.0, "event": "launch_started", "rank": None})
    log.write_bytes(b"\xff\xfe\x00garbage\n" + good.encode() + b"\n" + b"7\n")
    r = cli("report", str(log))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("args, expect", [
    (["sbatch", "-o", "/nonexistent/dir/train.sbatch", "train.py"], "-o /nonexistent/dir/train.sbatch"),
    (["doctor", "--nnodes", "abc"], "--nnodes 'abc'"),
    (["doctor", "--nproc-per-node", "-3"], "--nproc-per-node '-3'"),
])
def test_bad_flags_get_one_line_naming_the_flag(args, expect):
    r = cli(*args)
    assert r.returncode == 2 and expect in one_line_error(r)


def test_argument_lists_are_redacted_before_they_are_logged(monkeypatch):
    from elastic_resume.storage import redact_argv

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-value")
    argv = ["python", "-u", "train.py", "--storage-option", "secret=s3cr3t", "--storage-option=token=t0k3n",
            "--api-key", "k3y", "--password=pw", "--lr", "0.1", "--storage-option", "secret:typo",
            "--note", "uses env-secret-value", "--storage-option", "endpoint_url=http://127.0.0.1:9"]
    shown = " ".join(redact_argv(argv))
    for secret in ("s3cr3t", "t0k3n", "k3y", "pw", "typo", "env-secret-value"):
        assert secret not in shown
    assert "--lr 0.1" in shown and "endpoint_url=http://127.0.0.1:9" in shown


# -- soak: a saving job, a concurrent prune loop, SIGKILLs of both at random moments ---------
@pytest.mark.slow
def test_soak_saver_and_pruner_killed_at_random_never_lose_an_acknowledged_commit(tmp_path):
    import random
    import signal

    root = str(tmp_path / "ckpt")
    helpers = os.path.join(REPO, "tests", "helpers")
    rng = random.Random(11)
    acked = -1
    deadline = time.monotonic() + 60
    rounds = 0
    while time.monotonic() < deadline and rounds < 12:
        rounds += 1
        out = tmp_path / f"saver-{rounds}.out"
        with open(out, "w") as f:
            saver = subprocess.Popen([sys.executable, os.path.join(helpers, "soak_saver.py"), root],
                                     stdout=f, stderr=subprocess.DEVNULL, env=child_env(), start_new_session=True)
        pruner = subprocess.Popen([sys.executable, os.path.join(helpers, "soak_pruner.py"), root],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env(),
                                  start_new_session=True)
        try:
            time.sleep(rng.uniform(2.0, 5.0))  # interpreter start-up, resume, then saves and prunes
            victims = [saver, pruner]
            rng.shuffle(victims)
            for p in victims:
                os.kill(p.pid, signal.SIGKILL)
                time.sleep(rng.uniform(0, 0.3))
        finally:
            for p in (saver, pruner):
                if p.poll() is None:
                    p.kill()
                p.wait(timeout=30)
        lines = [line.split() for line in out.read_text().splitlines() if line.startswith("committed ")]
        if lines:
            acked = max(acked, int(lines[-1][1]))
        store = CheckpointStore(tamper.raw(root))
        newest = store.latest(full=True)
        if acked >= 0:
            assert newest is not None and newest >= acked, (rounds, newest, acked, store.step_dirs())
            target = {"w": None, "step": None}
            assert CheckpointManager(root, read_only=True).restore(target) == newest
            assert target["step"] == newest and float(target["w"][0]) == float(newest)
    assert acked > 0, "the saver never committed: the soak tested nothing"


def test_a_corrupt_step_in_the_retention_window_is_read_once_not_at_every_save(local_root, monkeypatch):
    from elastic_resume.storage import LocalStorage

    save_steps(local_root, (10, 20, 30))
    flip_same_size(local_root, 30)
    mgr = manager(local_root, keep_last=3)
    assert mgr.restore({"w": None, "n": None}) == 20
    opened: list[str] = []
    real = LocalStorage.open_stream

    def counting(self, rel, expected_size=None):
        opened.append(rel)
        return real(self, rel, expected_size)

    monkeypatch.setattr(LocalStorage, "open_stream", counting)
    for s in (21, 22, 23, 24):
        mgr.save(s, state_of(s))
    assert len([r for r in opened if r.startswith(step_dir(30))]) <= 1
    assert mgr.committed_steps() == [30, 24, 23, 22]  # 30 kept as evidence, 3 loadable kept
