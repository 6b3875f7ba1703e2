"""``elastic-resume export ROOT OUT``: the model weights of a verified step as one file other tools
open (safetensors, a torch state dict, a Lightning .ckpt), consolidated from replicated (DDP) and
sharded (FSDP2/DCP) state; and the data files themselves, which are safetensors files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from elastic_resume import CheckpointManager
from elastic_resume.checkpoint.layout import step_dir
from elastic_resume.checkpoint.store import CheckpointStore
from harness.processes import child_env
from tests.checkpoint.test_distributed import run_fsdp
from tests.helpers import tamper
from tests.helpers.torchrun import torchrun, why

safetensors_torch = pytest.importorskip("safetensors.torch")
FIXTURES = Path(__file__).parent.parent / "fixtures" / "written-by-0.2.0"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "elastic_resume.cli", *args], capture_output=True, text=True,
                          env=child_env(), timeout=120)


def ddp_model(hidden: int = 32) -> torch.nn.Module:
    """launch/train_ddp.py's model."""
    return torch.nn.Sequential(torch.nn.Linear(16, hidden), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                               torch.nn.Linear(hidden, 1))


@pytest.mark.slow
def test_a_ddp_checkpoint_exports_to_files_a_fresh_model_loads(local_root, tmp_path):
    r = torchrun(2, "--root", local_root.url, "--steps", "6", "--save-every", "3")
    assert r.returncode == 0, why(r)
    trained = ddp_model()
    assert CheckpointManager(local_root.url).restore({"model": trained}) == 6
    # Every data file of the step is a safetensors file the safetensors package opens.
    store = CheckpointStore(tamper.raw(local_root.url))
    names = set()
    for rel in tamper.data_files(tamper.raw(local_root.url), 6):
        assert rel.endswith(".safetensors")
        with safetensors_torch.safe_open(os.path.join(local_root.url, rel), "pt") as f:
            assert f.metadata()["format"] == "pt" and all(f.get_tensor(k) is not None for k in f.keys())
            names.update(f.keys())
    # Named by their place in the state, spread over both ranks' files.
    assert {"model.0.weight", "model.3.bias", "optimizer.state.0.exp_avg"} <= names
    assert store.committed_steps() == [6, 3]

    out = tmp_path / "model.safetensors"
    r = cli("export", local_root.url, str(out))
    assert r.returncode == 0, r.stderr
    assert "exported step 6" in r.stdout and "'model'" in r.stdout
    fresh = ddp_model()
    fresh.load_state_dict(safetensors_torch.load_file(out))  # strict: every name and shape
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), trained.state_dict().values()))

    pt = tmp_path / "model.pt"
    r = cli("export", local_root.url, str(pt), "--step", "3")
    assert r.returncode == 0 and "exported step 3" in r.stdout, r.stderr
    older = ddp_model()
    older.load_state_dict(torch.load(pt, weights_only=True))
    assert not torch.equal(older[0].weight, trained[0].weight)

    half = tmp_path / "model-bf16.safetensors"
    assert cli("export", local_root.url, str(half), "--dtype", "bf16").returncode == 0
    weights = safetensors_torch.load_file(half)
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert torch.equal(weights["0.weight"], trained[0].weight.to(torch.bfloat16))


@pytest.mark.slow
def test_an_fsdp2_checkpoint_exports_its_sharded_weights_whole(local_root, tmp_path):
    ref = tmp_path / "ref.json"
    r = run_fsdp(2, "save", "--root", local_root.url, "--out", str(ref))
    assert r.returncode == 0, why(r)
    expected = {k.removeprefix("param."): v for k, v in json.loads(ref.read_text()).items() if k.startswith("param.")}
    for name, fmt in (("model.safetensors", None), ("model.bin", "torch")):
        out = tmp_path / name
        r = cli("export", local_root.url, str(out), *(["--format", fmt] if fmt else []))
        assert r.returncode == 0, r.stderr
        weights = safetensors_torch.load_file(out) if fmt is None else torch.load(out, weights_only=True)
        fresh = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
        fresh.load_state_dict(weights)
        assert {k: v.flatten().tolist() for k, v in fresh.state_dict().items()} == expected
    # A damaged shard is named, never exported (DCP's wrapped failure unwrapped).
    st = tamper.raw(local_root.url)
    shard = next(f["path"] for f in tamper.manifest_doc(st, 3)["files"] if f["kind"] == "dcp")
    tamper.flip_byte(st, f"{step_dir(3)}/{shard}", 200)
    r = cli("export", local_root.url, str(tmp_path / "damaged.safetensors"), "--step", "3")
    assert r.returncode == 1 and shard.rsplit("/", 1)[-1] in r.stderr and "digest mismatch" in r.stderr, r.stderr
    assert not (tmp_path / "damaged.safetensors").exists()


def test_data_files_written_by_0_2_0_still_load_and_export(tmp_path):
    root = tmp_path / "plain"
    shutil.copytree(FIXTURES / "plain", root)
    state = {"w": None, "c": None, "step": None}
    assert CheckpointManager(str(root)).restore(state) == 7
    assert torch.equal(state["w"], torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert state["c"].dtype == torch.complex64 and state["step"] == 7
    out = tmp_path / "w.safetensors"
    r = cli("export", str(root), str(out), "--key", "w")
    assert r.returncode == 0, r.stderr
    assert torch.equal(safetensors_torch.load_file(out)["w"], state["w"])


def test_safetensors_files_round_trip_every_dtype_and_complex_values(tmp_path):
    from elastic_resume.checkpoint.format import DTYPES

    state = {name: (torch.arange(6).reshape(2, 3) % 2).to(dt) for name, dt in DTYPES.items()}
    mgr = CheckpointManager(str(tmp_path / "ckpt"))
    mgr.save(1, {"tensors": state, "empty": torch.empty(0, 3)})
    back = {"tensors": None, "empty": None}
    assert CheckpointManager(str(tmp_path / "ckpt")).restore(back) == 1
    for name, t in state.items():
        assert back["tensors"][name].dtype == t.dtype and torch.equal(back["tensors"][name], t), name
    assert back["empty"].shape == (0, 3)
    (data,) = tamper.data_files(tamper.raw(str(tmp_path / "ckpt")), 1)
    opened = safetensors_torch.load_file(tmp_path / "ckpt" / data)  # another reader agrees on every byte
    assert torch.equal(opened["tensors.float32"], state["float32"])
    assert torch.equal(torch.view_as_complex(opened["tensors.complex128"]), state["complex128"])


def test_export_mistakes_are_one_line_and_write_nothing(tmp_path):
    root = tmp_path / "ckpt"
    mgr = CheckpointManager(str(root))
    mgr.save(1, {"model": torch.nn.Linear(2, 2), "progress": {"step": 1}})
    mgr.save(2, {"model": torch.nn.Linear(2, 2), "progress": {"step": 2}})
    r = cli("export", str(root), str(tmp_path / "model.onnx"))
    assert r.returncode == 2 and "cannot tell the format" in r.stderr and "--format" in r.stderr
    r = cli("export", str(root), str(tmp_path / "m.pt"), "--key", "progress")
    assert r.returncode == 2 and "'progress' holds int at 'step', not model weights" in r.stderr
    r = cli("export", str(root), str(tmp_path / "m.pt"), "--key", "nope")
    assert r.returncode == 2 and "--key 'nope'" in r.stderr and "'model'" in r.stderr
    r = cli("export", str(root), str(tmp_path / "m.pt"), "--step", "9")
    assert r.returncode == 1 and "step 9 does not exist" in r.stderr
    st = tamper.raw(str(root))
    (data,) = tamper.data_files(st, 2)
    tamper.flip_byte(st, data, 100)
    r = cli("export", str(root), str(tmp_path / "m.pt"), "--step", "2")
    assert r.returncode == 1 and data.rsplit("/", 1)[-1] in r.stderr and "digest mismatch" in r.stderr
    # The newest loadable step by default: the damaged one is skipped, never exported.
    r = cli("export", str(root), str(tmp_path / "m.pt"))
    assert r.returncode == 0 and "exported step 1" in r.stdout, r.stderr
    r = cli("export", str(root), str(tmp_path / "m.pt"))
    assert r.returncode == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "m.pt"]
