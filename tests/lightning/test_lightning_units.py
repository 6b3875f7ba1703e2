"""The Lightning pieces in one process: ElasticCheckpointIO's contract (atomic rewrite, removal,
verification, errors), ResumableDataLoader's position, and the configuration errors users meet
first. The distributed behaviour is in test_lightning.py."""

from __future__ import annotations

import csv
import os
import pathlib
from argparse import Namespace

import pytest

pytest.importorskip("pytorch_lightning", reason="the Lightning integration needs the 'pytorch-lightning' extra")

import pytorch_lightning as pl  # the spelling of the example script (launch/train_lightning.py)
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.plugins.io import AsyncCheckpointIO
from torch.utils.data import TensorDataset

from elastic_resume import (
    CheckpointSaveError,
    ConfigError,
    DriftError,
    EventLog,
    GaveUpError,
    NoCheckpointError,
    ResumableDistributedSampler,
    RobustZScore,
    RollbackPolicy,
)
from elastic_resume.events import read_events
from elastic_resume.lightning import (
    ElasticCheckpointIO,
    ElasticResume,
    ResumableDataLoader,
    load_checkpoint,
)
from launch.train_lightning import Regression, SyntheticData


def checkpoint(step: int, value: float = 1.0) -> dict:
    return {"global_step": step, "epoch": 0, "state_dict": {"w": torch.full((3, 2), value)},
            "loops": {"fit_loop": {"x": [1, 2]}}, "hyper_parameters": {"lr": 0.1, "name": "m"}}


def flip_a_byte(checkpoint) -> None:
    """In the middle of a single-file checkpoint, or of a bundle's first data file."""
    data = checkpoint if checkpoint.is_file() else sorted(p for p in checkpoint.rglob("*.safetensors"))[0]
    with open(data, "r+b") as f:
        f.seek(os.path.getsize(data) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))


def test_rewriting_a_path_commits_the_new_step_then_drops_the_old(tmp_path):
    io = ElasticCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint(checkpoint(7, 1.0), path)
    io.save_checkpoint(checkpoint(9, 2.0), path)
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]  # one file, no temporary left
    assert torch.load(path, weights_only=True)["global_step"] == 9  # what Lightning's default reads
    loaded = io.load_checkpoint(path)
    assert loaded["global_step"] == 9 and torch.equal(loaded["state_dict"]["w"], torch.full((3, 2), 2.0))
    assert loaded["hyper_parameters"] == {"lr": 0.1, "name": "m"}
    io.save_checkpoint(checkpoint(9, 3.0), path)  # the same step again replaces it
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.full((3, 2), 3.0))
    io.remove_checkpoint(path)
    assert not path.exists()


def test_saving_a_path_again_at_a_lower_step_keeps_the_new_state(tmp_path):
    """A path means the last thing saved there: a new run writing last.ckpt over an old run's,
    a run resumed from an older checkpoint, a reused save_checkpoint("final.ckpt")."""
    log = tmp_path / "events.jsonl"
    io = ElasticCheckpointIO(event_log=EventLog(log))
    path = tmp_path / "ckpt" / "last.ckpt"
    io.save_checkpoint(checkpoint(1000, 1000.0), path)
    io.save_checkpoint(checkpoint(50, 50.0), path)
    assert path.is_file()
    for loaded in (io.load_checkpoint(path), load_checkpoint(path)):
        assert loaded["global_step"] == 50 and torch.equal(loaded["state_dict"]["w"], torch.full((3, 2), 50.0))
    gone = [e for e in read_events(log) if e["event"] == "checkpoint_deleted"]
    assert [e["step"] for e in gone] == [1000] and "saved again" in gone[0]["reason"]
    # Beside an old run's higher-numbered bundle, a resume takes the bundle saved last.
    io.save_checkpoint(checkpoint(900, 900.0), tmp_path / "ckpt" / "epoch=9-step=900.ckpt")
    io.save_checkpoint(checkpoint(60, 60.0), path)
    assert io.resume_path(tmp_path / "ckpt") == str(path)
    assert io.load_checkpoint(io.resume_path(tmp_path / "ckpt"))["global_step"] == 60


BUNDLE_0_2_0 = pathlib.Path(__file__).parent.parent / "fixtures" / "written-by-0.2.0" / "epoch=0-step=4.ckpt"


def test_a_path_holding_a_bundle_is_saved_as_a_bundle_again_and_a_crash_in_its_clean_up_loads_the_newest(tmp_path):
    """last.ckpt of a run that upgraded is a directory: it cannot become a file without a moment
    in which neither exists, so it stays a bundle."""
    import shutil

    io = ElasticCheckpointIO()
    path = tmp_path / "last.ckpt"
    shutil.copytree(BUNDLE_0_2_0, path)
    kept = tmp_path / "kept"
    shutil.copytree(path / "step-000000000004", kept)
    io.save_checkpoint(checkpoint(2, 50.0), path)
    assert path.is_dir() and sorted(n for n in os.listdir(path) if n.startswith("step-")) == ["step-000000000002"]
    shutil.copytree(kept, path / "step-000000000004")  # as if the clean-up never ran
    loaded = io.load_checkpoint(path)
    assert loaded["global_step"] == 2 and torch.equal(loaded["state_dict"]["w"], torch.full((3, 2), 50.0))


def test_a_re_save_that_fails_half_way_leaves_the_old_file_loadable(tmp_path, monkeypatch):
    from elastic_resume.checkpoint import single_file

    io = ElasticCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint(checkpoint(1000, 1000.0), path)

    def fail_half_way(out, *args, **kwargs):  # the disk fills up half-way through the new file
        out.write(b"x" * 1000)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(single_file, "write_file", fail_half_way)
    with pytest.raises(CheckpointSaveError, match=r"last\.ckpt \(step 50\) was not saved.*No space left"):
        io.save_checkpoint(checkpoint(50, 50.0), path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]  # the temporary file is gone
    assert io.load_checkpoint(path)["global_step"] == 1000


def test_resume_path_is_the_newest_and_loading_it_falls_back_past_corruption(tmp_path):
    log = tmp_path / "events.jsonl"
    io = ElasticCheckpointIO(event_log=EventLog(log))
    assert io.resume_path(tmp_path / "ckpt") is None
    assert [e["event"] for e in read_events(log)] == ["restore_none"]
    for step in (5, 10, 15):
        io.save_checkpoint(checkpoint(step, float(step)), tmp_path / "ckpt" / f"step={step}.ckpt")
    os.makedirs(tmp_path / "ckpt" / "step=20.ckpt" / "step-000000000020")  # a save that never committed
    newest = io.resume_path(tmp_path / "ckpt")
    assert newest == str(tmp_path / "ckpt" / "step=15.ckpt")
    flip_a_byte(tmp_path / "ckpt" / "step=15.ckpt")
    assert io.load_checkpoint(newest)["global_step"] == 10
    found = [e for e in read_events(log) if e["event"] == "corruption_found"]
    assert found and found[0]["step"] == 15 and "digest mismatch" in found[0]["reason"]
    # A path the user chose is that checkpoint or an error naming its file, never another one.
    fresh = ElasticCheckpointIO()
    with pytest.raises(NoCheckpointError, match=r"step=15\.ckpt.*digest mismatch"):
        fresh.load_checkpoint(newest)
    with pytest.raises(NoCheckpointError, match="no committed checkpoint at"):
        fresh.load_checkpoint(tmp_path / "ckpt" / "step=20.ckpt")


def test_save_errors_name_what_is_wrong_and_commit_nothing(tmp_path, caplog):
    io = ElasticCheckpointIO()
    bad = checkpoint(1)
    bad["state_dict"]["extra"] = object()  # model state is never converted: an error naming it
    with pytest.raises(CheckpointSaveError, match=r"\['state_dict'\]\['extra'\].*cannot be checkpointed"):
        io.save_checkpoint(bad, tmp_path / "b.ckpt")
    assert io.checkpoints(tmp_path) == []
    # A hyper-parameter with no pickle-free form is saved as its text, with a warning: a config
    # holding a callable must not fail fit() at its first checkpoint.
    odd = checkpoint(2)
    odd["hyper_parameters"]["make"] = __import__("functools").partial(max, 1)
    with caplog.at_level("WARNING", logger="elastic_resume"):
        io.save_checkpoint(odd, tmp_path / "c.ckpt")
    assert "hyper-parameter ['hyper_parameters']['make'] (partial) cannot be saved without pickle" in caplog.text
    assert io.load_checkpoint(tmp_path / "c.ckpt")["hyper_parameters"]["make"] == "functools.partial(<built-in function max>, 1)"


def test_resumable_dataloader_counts_delivered_batches_and_keeps_a_whole_epoch_length():
    data = TensorDataset(torch.arange(50))
    loader = ResumableDataLoader(data, sampler=ResumableDistributedSampler(data, num_replicas=2, rank=0, shuffle=False),
                                 batch_size=4, num_workers=1)
    assert len(loader) == 7  # 25 samples per rank
    it = iter(loader)
    first = [next(it)[0].tolist() for _ in range(3)]
    state = loader.state_dict()
    assert state["consumed"] == 24  # 3 batches x 4 samples x 2 ranks, whatever the worker prefetched
    assert len(loader) == 7
    again = ResumableDataLoader(data, sampler=ResumableDistributedSampler(data, num_replicas=2, rank=0, shuffle=False),
                                batch_size=4)
    again.load_state_dict(state)
    assert next(iter(again))[0].tolist() == [24, 26, 28, 30]
    assert first[0] == [0, 2, 4, 6]
    with pytest.raises(ConfigError, match="use_distributed_sampler=False"):
        ResumableDataLoader(data, sampler=torch.utils.data.SequentialSampler(data))


def trainer(tmp_path, plugins, callbacks, steps: int = 12) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, use_distributed_sampler=False, plugins=plugins,
                      callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1), *callbacks],
                      logger=False, enable_progress_bar=False, enable_model_summary=False)


def test_async_wrapper_and_async_save_both_commit_verified_checkpoints(tmp_path):
    for kind, io in (("wrapped", ElasticCheckpointIO()), ("async", ElasticCheckpointIO(async_save=True))):
        plugin = AsyncCheckpointIO(io) if kind == "wrapped" else io
        t = trainer(tmp_path / kind, [plugin], [ElasticResume()])
        t.fit(Regression(8, 0.05), datamodule=SyntheticData(64, 4, 0))
        assert [s for s, _ in io.checkpoints(tmp_path / kind / "ckpt")] == [12, 8, 4]
        resumed = trainer(tmp_path / kind, [plugin], [ElasticResume()], steps=16)
        resumed.fit(Regression(8, 0.05), datamodule=SyntheticData(64, 4, 0), ckpt_path=io.resume_path(tmp_path / kind / "ckpt"))
        assert resumed.global_step == 16 and next(s for s, _ in io.checkpoints(tmp_path / kind / "ckpt")) == 16


def test_callback_without_the_plugin_is_a_clear_error(tmp_path):
    t = trainer(tmp_path, None, [ElasticResume()])
    with pytest.raises(ConfigError, match=r"plugins=\[ElasticCheckpointIO"):
        t.fit(Regression(8, 0.05), datamodule=SyntheticData(64, 4, 0))
    with pytest.raises(ConfigError, match="drift"):
        ElasticResume(drift="sometimes")


def test_resume_reports_drift_in_hyperparameters(tmp_path, caplog):
    log = tmp_path / "events.jsonl"
    io = ElasticCheckpointIO(event_log=EventLog(log))
    root = tmp_path / "ckpt"
    trainer(tmp_path, [io], [ElasticResume()], steps=4).fit(Regression(8, 0.05), datamodule=SyntheticData(64, 4, 0))
    with caplog.at_level("WARNING", logger="elastic_resume"):
        trainer(tmp_path, [io], [ElasticResume()], steps=8).fit(
            Regression(8, 0.02), datamodule=SyntheticData(64, 4, 0), ckpt_path=io.resume_path(root))
    drift = [e for e in read_events(log) if e["event"] == "drift_found"]
    assert len(drift) == 1 and drift[0]["step"] == 4
    (lr_line,) = [d for d in drift[0]["differences"] if d.startswith("config.lr: saved 0.05, now 0.02")]
    assert "overridden by the checkpoint: the restored optimizer keeps lr=0.048" in lr_line
    assert "differs from the run that saved it" in caplog.text
    with pytest.raises(DriftError, match=r"config\.lr: saved 0\.02, now 0\.03"):
        trainer(tmp_path, [io], [ElasticResume(drift="fail")], steps=12).fit(
            Regression(8, 0.03), datamodule=SyntheticData(64, 4, 0), ckpt_path=io.resume_path(root))


def test_spike_with_the_budget_spent_raises_gave_up_out_of_fit(tmp_path):
    faults = Namespace(spike_at_step=9, spike_rank=0, spike_factor=1e4, fault_dir=str(tmp_path), loss_log=None,
                       step_seconds=0, die_rank=-1, die_at_steps="")
    guard = ElasticResume(policy=RollbackPolicy(budget=0), detectors=[RobustZScore(window=8, z=8.0)])
    with pytest.raises(GaveUpError, match="rollback budget of 0 is spent"):
        trainer(tmp_path, [ElasticCheckpointIO()], [guard]).fit(Regression(8, 0.05, args=faults),
                                                                  datamodule=SyntheticData(64, 4, 0))


def test_recovery_metrics_count_what_the_guard_did():
    from elastic_resume.metrics import RecoveryMetrics

    m = RecoveryMetrics()
    assert m.update({"event": "rollback", "lr_scale": 0.5, "steps_lost": 4}) == {
        "elastic_resume/rollbacks": 1.0, "elastic_resume/lr_scale": 0.5, "elastic_resume/steps_lost": 4.0}
    assert m.update({"event": "rollback", "lr_scale": "x", "cause": "replica_divergence"}) == {
        "elastic_resume/rollbacks": 2.0, "elastic_resume/divergence_rollbacks": 1.0}  # a bad field is left out
    assert m.update({"event": "data_skipped", "samples": 96})["elastic_resume/samples_skipped"] == 96.0
    assert m.update({"event": "data_skipped", "samples": 32})["elastic_resume/samples_skipped"] == 128.0
    assert m.update({"event": "straggler_detected", "ratio": 2.5}) == {"elastic_resume/stragglers": 1.0,
                                                                         "elastic_resume/straggler_ratio": 2.5}
    assert m.update({"event": "save_committed", "step": 4}) == {}
    assert m.at_start(restarts=2, resumed_from=None) == {"elastic_resume/restarts": 2.0}


def test_the_trainers_own_logger_receives_rollbacks_and_skipped_samples(tmp_path):
    """A CSVLogger the user configured: its metrics file holds the recovery curve."""
    faults = Namespace(spike_at_step=9, spike_rank=0, spike_factor=1e4, fault_dir=str(tmp_path), loss_log=None,
                       step_seconds=0, die_rank=-1, die_at_steps="")
    guard = ElasticResume(policy=RollbackPolicy(margin=2, skip_after=2, lr_scale=0.5),
                          detectors=[RobustZScore(window=8, z=8.0)])
    t = pl.Trainer(accelerator="cpu", devices=1, max_steps=12, use_distributed_sampler=False,
                   plugins=[ElasticCheckpointIO()], logger=CSVLogger(tmp_path, name="csv"),
                   callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1), guard],
                   enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    t.fit(Regression(8, 0.05, args=faults), datamodule=SyntheticData(64, 4, 0))
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = {k: float(v) for row in rows for k, v in row.items() if k.startswith("elastic_resume/") and v}
    assert logged["elastic_resume/restarts"] == 0.0
    assert logged["elastic_resume/rollbacks"] == 1.0 and logged["elastic_resume/lr_scale"] == 0.5
    assert logged["elastic_resume/steps_lost"] >= 1 and logged["elastic_resume/samples_skipped"] > 0


def test_a_crash_loop_on_the_newest_checkpoint_falls_back_to_the_one_before(tmp_path):
    log = tmp_path / "events.jsonl"
    io = ElasticCheckpointIO(event_log=EventLog(log), max_resumes_per_step=2)
    for step in (5, 10):
        io.save_checkpoint(checkpoint(step), tmp_path / "ckpt" / f"step={step}.ckpt")
    resumed = [io.load_checkpoint(io.resume_path(tmp_path / "ckpt"))["global_step"] for _ in range(4)]
    assert resumed == [10, 10, 5, 5]  # two resumes from step 10 without progress; 5 is never dropped
    loops = [e for e in read_events(log) if e["event"] == "resume_crash_loop"]
    assert [e["step"] for e in loops] == [10, 10]
    io.save_checkpoint(checkpoint(15), tmp_path / "ckpt" / "step=15.ckpt")  # progress resets the count
    assert io.load_checkpoint(io.resume_path(tmp_path / "ckpt"))["global_step"] == 15


def test_top_k_by_a_monitored_metric_removes_whole_bundles(tmp_path):
    io = ElasticCheckpointIO()
    top = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="train_loss", mode="min", save_top_k=2,
                          every_n_train_steps=2)
    t = pl.Trainer(accelerator="cpu", devices=1, max_steps=16, use_distributed_sampler=False, plugins=[io],
                   callbacks=[top, ElasticResume()], logger=False, enable_progress_bar=False, enable_model_summary=False)
    t.fit(Regression(8, 0.05), datamodule=SyntheticData(64, 4, 0))
    kept = sorted(os.listdir(tmp_path / "ckpt"))
    assert len(kept) == 2 and sorted(os.path.basename(p) for p in top.best_k_models) == kept
    assert [s for s, _ in io.checkpoints(tmp_path / "ckpt")] == sorted(
        (int(name.split("step=")[1].split(".")[0]) for name in kept), reverse=True)
    best = io.load_checkpoint(top.best_model_path)
    assert best["global_step"] == int(os.path.basename(top.best_model_path).split("step=")[1].split(".")[0])


@pytest.mark.parametrize("namespace", ["pytorch_lightning", "lightning.pytorch"])
def test_either_namespace_trainer_takes_the_plugin_and_the_callback(tmp_path, namespace):
    """Both distributions importable in one process: the same classes serve either Trainer."""
    import importlib

    lpl = importlib.import_module(namespace)

    class Tiny(lpl.LightningModule):
        def __init__(self, root: pathlib.Path = pathlib.Path("/data"), stage: Stage = Stage.TRAIN) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    ckpt = lpl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)

    def fit(steps: int, ckpt_path=None) -> lpl.Trainer:
        io = ElasticCheckpointIO()
        t = lpl.Trainer(accelerator="cpu", devices=1, max_steps=steps, plugins=[io], logger=False,
                        callbacks=[ckpt, ElasticResume(policy=RollbackPolicy(margin=1))], enable_progress_bar=False,
                        enable_model_summary=False)
        t.fit(Tiny(), torch.utils.data.DataLoader(data, batch_size=8), ckpt_path=ckpt_path)
        return t

    fit(6)
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["epoch=0-step=3.ckpt", "epoch=0-step=6.ckpt"]
    resumed = fit(9, ckpt_path=ElasticCheckpointIO().resume_path(tmp_path / "ckpt"))
    assert resumed.global_step == 9
    # This namespace's own loader, through a weights-only load: typed values for the stdlib and
    # the allowlisted enum, nothing else constructed.
    from elastic_resume.lightning import load_from_checkpoint

    model = load_from_checkpoint(Tiny, tmp_path / "ckpt" / "epoch=1-step=9.ckpt", allowed_classes=[Stage])
    assert model.hparams.root == pathlib.Path("/data") and model.hparams.stage is Stage.TRAIN


def test_plugin_callback_and_trainer_are_picklable_before_and_after_fit(tmp_path):
    """ddp_spawn, deepcopy(trainer.callbacks) and torch.save(trainer) pickle them."""
    import copy
    import pickle

    io = ElasticCheckpointIO(event_log=tmp_path / "events.jsonl")
    guard = ElasticResume(policy=RollbackPolicy(margin=1))
    for obj in (io, guard):
        assert type(pickle.loads(pickle.dumps(obj))) is type(obj)
    t = trainer(tmp_path, [io], [guard], steps=8)
    t.fit(Regression(8, 0.05), datamodule=SyntheticData(64, 8, 0))
    copies = copy.deepcopy(t.callbacks)
    (copied,) = [c for c in copies if isinstance(c, ElasticResume)]
    assert copied.guard is None and guard.guard is not None  # the copy's is rebuilt at its setup
    clone = pickle.loads(pickle.dumps(io))
    clone.save_checkpoint(checkpoint(3), tmp_path / "copy.ckpt")  # a copy saves with buffers of its own
    assert clone.load_checkpoint(tmp_path / "copy.ckpt")["global_step"] == 3
    # (t itself holds the example's LambdaLR, which no pickler takes; a trainer holding the used plugin and callback)
    torch.save(trainer(tmp_path, [io], [guard]), tmp_path / "trainer.pt")
    assert any(e["event"] == "save_committed" for e in read_events(str(tmp_path / "events.jsonl")))


def test_a_missing_checkpoint_path_is_a_file_not_found_error(tmp_path):
    from elastic_resume import CheckpointNotFoundError

    io = ElasticCheckpointIO()
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at .*nope.ckpt: the path does not exist") as err:
        io.load_checkpoint(tmp_path / "nope.ckpt")
    assert isinstance(err.value, CheckpointNotFoundError) and isinstance(err.value, NoCheckpointError)
    # Lightning's own tests (and users' scripts) match its wording: it leads, our detail follows.
    t = trainer(tmp_path, [ElasticCheckpointIO()], [], steps=4)
    with pytest.raises(FileNotFoundError, match=r"Checkpoint file not found: .*nope\.ckpt"):
        t.fit(Regression(8, 0.05), datamodule=SyntheticData(64, 8, 0), ckpt_path=str(tmp_path / "nope.ckpt"))


def test_plain_checkpoints_from_before_the_plugin_are_resumed_once_then_bundles(tmp_path, caplog):
    plain = trainer(tmp_path, None, [], steps=8)  # Lightning's default TorchCheckpointIO
    plain.fit(Regression(8, 0.05), datamodule=SyntheticData(64, 8, 0))
    ckpt = tmp_path / "ckpt"
    assert all(p.is_file() for p in ckpt.iterdir())
    io = ElasticCheckpointIO(event_log=tmp_path / "events.jsonl")
    path = io.resume_path(ckpt)
    assert path.endswith("epoch=0-step=8.ckpt")
    t = trainer(tmp_path, [io], [ElasticResume(policy=RollbackPolicy(margin=1))], steps=12)
    with caplog.at_level("WARNING", logger="elastic_resume"):
        t.fit(Regression(8, 0.05), datamodule=SyntheticData(64, 8, 0), ckpt_path=path)
    assert t.global_step == 12
    assert "a plain checkpoint written without ElasticCheckpointIO" in caplog.text
    migrated = [e for e in read_events(str(tmp_path / "events.jsonl")) if e["event"] == "checkpoint_migrated"]
    assert [(e["path"], e["step"]) for e in migrated] == [(path, 8)]
    assert (ckpt / "epoch=1-step=12.ckpt").is_file()  # saved with an integrity record
    assert "elastic_resume" in __import__("zipfile").ZipFile(ckpt / "epoch=1-step=12.ckpt").comment.decode()
    assert ElasticCheckpointIO().resume_path(ckpt).endswith("epoch=1-step=12.ckpt")


def test_a_plain_checkpoint_holding_arbitrary_objects_is_refused_not_unpickled(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"global_step": 1, "state_dict": {}, "evil": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(NoCheckpointError, match=r"evil.ckpt.*weights_only=True"):
        ElasticCheckpointIO().load_checkpoint(tmp_path / "evil.ckpt")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.s3
def test_storage_options_given_per_save_apply_to_that_save(tmp_path, s3_endpoint):
    from harness.s3 import make_bucket

    bucket = make_bucket(s3_endpoint)
    options = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    io = ElasticCheckpointIO()  # no options of its own, no AWS_ENDPOINT_URL in the environment
    io.save_checkpoint(checkpoint(5, 2.0), f"s3://{bucket}/run/last.ckpt", storage_options=options)
    loaded = ElasticCheckpointIO(storage_options=options).load_checkpoint(f"s3://{bucket}/run/last.ckpt")
    assert loaded["global_step"] == 5 and torch.equal(loaded["state_dict"]["w"], torch.full((3, 2), 2.0))
    with pytest.raises(ConfigError, match=r"storage_options for .* must be a dict"):
        io.save_checkpoint(checkpoint(6), tmp_path / "x.ckpt", storage_options="endpoint")


class Evaluated(Regression):
    def test_step(self, batch, batch_idx):
        _, x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.log("test_loss", loss)
        return loss


def test_a_bundle_loads_the_lightning_way_and_exports_to_a_standard_ckpt(tmp_path):
    import subprocess
    import sys

    io = ElasticCheckpointIO()
    t = trainer(tmp_path, [io], [], steps=8)
    model = Evaluated(8, 0.05)
    data = SyntheticData(64, 8, 0)
    t.fit(model, datamodule=data)
    best = t.checkpoint_callback.best_model_path
    assert best.endswith("step=8.ckpt") and os.path.isfile(best)
    trained = {k: v.clone() for k, v in model.state_dict().items()}

    # the one-liner: verified, in this process, through Lightning's own load_from_checkpoint
    from elastic_resume.lightning import load_from_checkpoint

    loaded = load_from_checkpoint(Evaluated, best)
    assert loaded.hparams.hidden == 8
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in trained.items())

    # trainer.test with the plugin reads the bundle
    data.test_dataloader = data.train_dataloader
    (result,) = t.test(model, datamodule=data, ckpt_path="best")
    assert "test_loss" in result

    # export: a standard .ckpt file that Lightning and torch.load(weights_only=True) read
    out = tmp_path / "model.ckpt"
    cli = [sys.executable, "-m", "elastic_resume.cli", "export", best, str(out)]
    r = subprocess.run(cli, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "exported step 8" in r.stdout
    assert torch.load(out, weights_only=True)["global_step"] == 8
    exported = Evaluated.load_from_checkpoint(out)
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in trained.items())
    r = subprocess.run(cli, capture_output=True, text=True)  # never over an existing file
    assert r.returncode == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr
    flip_a_byte(__import__("pathlib").Path(best))
    r = subprocess.run([*cli[:-1], str(tmp_path / "other.ckpt")], capture_output=True, text=True)
    assert r.returncode == 1 and "digest mismatch" in r.stderr and not (tmp_path / "other.ckpt").exists()


def test_ls_latest_verify_list_the_bundles_of_a_model_checkpoint_directory(tmp_path):
    import subprocess
    import sys

    t = trainer(tmp_path, [ElasticCheckpointIO()], [], steps=12)
    t.fit(Regression(8, 0.05), datamodule=SyntheticData(64, 8, 0))
    ckpt = tmp_path / "ckpt"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "elastic_resume.cli", *args], capture_output=True, text=True)

    r = cli("ls", str(ckpt))
    assert r.returncode == 0, r.stderr
    rows = [line.split()[:3] for line in r.stdout.splitlines()[1:] if not line.startswith("(")]
    assert rows == [["epoch=1-step=12.ckpt", "12", "committed"], ["epoch=0-step=8.ckpt", "8", "committed"],
                    ["epoch=0-step=4.ckpt", "4", "committed"]]
    r = cli("latest", str(ckpt))
    assert (r.returncode, r.stdout.strip()) == (0, str(ckpt / "epoch=1-step=12.ckpt"))
    flip_a_byte(ckpt / "epoch=1-step=12.ckpt")
    r = cli("verify", str(ckpt))
    assert r.returncode == 1
    assert "epoch=1-step=12.ckpt step 12: CORRUPT" in r.stdout and "epoch=0-step=8.ckpt step 8: OK" in r.stdout
    r = cli("latest", str(ckpt))  # the one a resume would load
    assert (r.returncode, r.stdout.strip()) == (0, str(ckpt / "epoch=0-step=8.ckpt"))
    assert ElasticCheckpointIO().load_checkpoint(r.stdout.strip())["global_step"] == 8


class Stage(__import__("enum").Enum):
    TRAIN = "train"


@__import__("dataclasses").dataclass
class Schedule:
    warmup: int
    decay: float


class Configured(Regression):
    """A module whose hyper-parameters are of the types users keep in configs."""

    def __init__(self, cfg, root, stage, tags, schedule, started, loader_args, factory, scale, hidden=8, lr=0.05):
        super().__init__(hidden, lr)
        self.save_hyperparameters()


def test_hyperparameters_of_ordinary_types_save_load_and_export_without_pickle(tmp_path, caplog):
    import datetime as dt
    import functools
    import pathlib
    import subprocess
    import sys

    import numpy as np
    from omegaconf import DictConfig, OmegaConf

    from elastic_resume.lightning import load_from_checkpoint

    hparams = dict(
        cfg=OmegaConf.create({"depth": 2, "name": "${stage}", "stage": "a"}), root=pathlib.Path("/data/x"),
        stage=Stage.TRAIN, tags={"b", "a"}, schedule=Schedule(100, 0.5), started=dt.datetime(2026, 12, 1, 8, 0),
        loader_args=Namespace(workers=2, inner=Namespace(pin=True)), factory=functools.partial(torch.optim.SGD, lr=0.1),
        scale=np.float32(0.5),
    )
    mine = [Stage, "tests.lightning.test_lightning_units:Schedule"]  # the user's own classes, allowlisted
    io = ElasticCheckpointIO(allowed_classes=mine)
    t = trainer(tmp_path, [io], [ElasticResume()], steps=4)
    with caplog.at_level("WARNING", logger="elastic_resume"):
        t.fit(Configured(**hparams), datamodule=SyntheticData(64, 4, 0))  # no failed save in fit
    assert "['hyper_parameters']['factory'] (partial) cannot be saved without pickle" in caplog.text
    best = t.checkpoint_callback.best_model_path
    restored = io.load_checkpoint(best)["hyper_parameters"]
    assert isinstance(restored["cfg"], DictConfig) and restored["cfg"].name == "a"  # the interpolation still resolves
    # Lightning's own loader gets what weights_only=True reads: the config as a dict, resolved.
    loaded = load_from_checkpoint(Configured, best, allowed_classes=mine).hparams
    assert loaded.cfg == {"depth": 2, "name": "a", "stage": "a"}
    unlisted = load_from_checkpoint(Configured, best).hparams  # nothing allowlisted: plain values, no class built
    assert unlisted.stage == "train" and unlisted.schedule == {"warmup": 100, "decay": 0.5}
    assert loaded.root == pathlib.Path("/data/x") and loaded.stage is Stage.TRAIN and loaded.tags == {"a", "b"}
    assert loaded.schedule == Schedule(100, 0.5) and loaded.started == dt.datetime(2026, 12, 1, 8, 0)
    assert loaded.loader_args.inner.pin is True and loaded.scale == 0.5
    assert loaded.factory.startswith("functools.partial(<class 'torch.optim.sgd.SGD'>")
    # A resume restores the same hyper-parameters: no drift reported for any of them.
    caplog.clear()
    with caplog.at_level("WARNING", logger="elastic_resume"):
        trainer(tmp_path, [io], [ElasticResume()], steps=8).fit(
            Configured(**hparams), datamodule=SyntheticData(64, 4, 0), ckpt_path=io.resume_path(tmp_path / "ckpt"))
    assert "differs from the run that saved it" not in caplog.text
    # Exported: plain values only, so torch.load(weights_only=True) and Lightning's own loader read it.
    out = tmp_path / "model.ckpt"
    r = subprocess.run([sys.executable, "-m", "elastic_resume.cli", "export", best, str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    exported = torch.load(out, weights_only=True)["hyper_parameters"]
    assert exported["root"] == "/data/x" and exported["stage"] == "train" and exported["tags"] == ["a", "b"]
    assert exported["cfg"] == {"depth": 2, "name": "${stage}", "stage": "a"}
    assert exported["schedule"] == {"warmup": 100, "decay": 0.5}
    assert Configured.load_from_checkpoint(out).hparams.loader_args == {"workers": 2, "inner": {"pin": True}}
