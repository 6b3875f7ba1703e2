"""A LightningCLI script (``tests/helpers/lightning_cli_autoencoder.py``, the shape of Lightning's
autoencoder example, ``import pytorch_lightning``) configured with the plugin and the callbacks
through jsonargparse: a YAML config names ``ElasticResume``, its detectors and policy by
class_path, ``trainer_defaults`` holds a ``lazy_instance`` of ``ElasticCheckpointIO``. Under a
real ``elastic-resume launch``, killed and resumed, it continues bit for bit, and jsonargparse
describes every part (no warning that it cannot)."""

from __future__ import annotations

import json
import os

import pytest

from elastic_resume.events import read_events
from harness.processes import REPO
from tests.helpers.launcher import launcher_cmd
from tests.helpers.lightning_namespaces import only

pytest.importorskip("jsonargparse")

SCRIPT = os.path.join(REPO, "tests", "helpers", "lightning_cli_autoencoder.py")
CONFIG = """\
trainer:
  callbacks:
    - class_path: pytorch_lightning.callbacks.ModelCheckpoint
      init_args: {{dirpath: {ckpt}, every_n_train_steps: 5, save_top_k: -1}}
    - class_path: elastic_resume.lightning.ElasticResume
      init_args:
        detectors:
          - class_path: elastic_resume.NonFinite
          - class_path: elastic_resume.MaxRatio
            init_args: {{ratio: 3.0, window: 128}}
        policy: {{margin: 5, skip_after: 4, budget: 2}}
"""


def launch(tmp_path, name: str, die_at_step: int = 0):
    work = tmp_path / name
    work.mkdir()
    config = work / "config-in.yaml"
    config.write_text(CONFIG.format(ckpt=work / "ckpt"))
    env = only("pytorch_lightning", {"LOSS_LOG": str(work / "loss.jsonl"), "FAULT_DIR": str(work),
                                     "DIE_AT_STEP": str(die_at_step)})
    cmd = launcher_cmd("--standalone", "--nproc-per-node=2", "--max-restarts=1", f"--er-event-log={work / 'events.jsonl'}",
                       script=SCRIPT,
                       args=("--config", str(config), "--trainer.devices", "2", "--trainer.default_root_dir", str(work)))
    r = subprocess_in(work, cmd, env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    losses = {}
    for line in (work / "loss.jsonl").read_text().splitlines():
        row = json.loads(line)
        losses[(row["rank"], row["step"])] = row["loss"]  # a redone step's value replaces the first
    return r, losses, read_events(str(work / "events.jsonl"))


def subprocess_in(cwd, cmd, env):
    import subprocess

    from harness.processes import child_env

    return subprocess.run(cmd, capture_output=True, text=True, env=child_env(env), cwd=cwd, timeout=600)


@pytest.mark.slow
def test_a_lightning_cli_script_configured_through_jsonargparse_resumes_bit_for_bit(tmp_path):
    r, whole, _ = launch(tmp_path, "whole")
    out = r.stdout + r.stderr
    assert "JsonargparseWarning" not in out and "Unable to serialize" not in out, out[-3000:]
    assert sorted({s for _, s in whole}) == list(range(1, 33))  # 256 samples, 2 ranks, 8 a batch, 2 epochs
    saved = (tmp_path / "whole" / "config.yaml").read_text()  # what SaveConfigCallback wrote
    assert "class_path: elastic_resume.lightning.ElasticCheckpointIO" in saved
    assert "class_path: elastic_resume.MaxRatio" in saved and "skip_after: 4" in saved
    _, resumed, events = launch(tmp_path, "resumed", die_at_step=12)
    assert sorted((e["rank"], e["step"]) for e in events if e["event"] == "restored") == [(0, 10), (1, 10)]
    assert resumed == whole
