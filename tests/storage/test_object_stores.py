"""Checkpoint roots on Google Cloud Storage (fake-gcs-server), Azure Blob Storage (Azurite) and
fsspec's in-process ``memory://``, started by the tests themselves.

A commit is a create-only write of the manifest, and replacing a committed step (a rollback's
re-committed anchor, a re-saved step) is a compare-and-swap. Each emulator is first checked to
honour the precondition the backend relies on; then the manager's contract runs on each root."""

from __future__ import annotations

import os
import uuid

import pytest
import torch

from elastic_resume import CheckpointManager, CommitConflictError
from elastic_resume.events import EventLog, read_events
from elastic_resume.storage import digest_bytes, open_storage
from tests.helpers.roots import Root


def gcs_root(endpoint: str) -> Root:
    from gcsfs.core import GCSFileSystem

    bucket = f"ckpt-{uuid.uuid4().hex[:12]}"
    GCSFileSystem(endpoint_url=endpoint, token="anon", skip_instance_cache=True).mkdir(bucket)
    return Root("gcs", f"gs://{bucket}/run", {"endpoint_url": endpoint, "token": "anon"})


def azure_root(connection: str) -> Root:
    from azure.storage.blob import BlobServiceClient

    container = f"ckpt-{uuid.uuid4().hex[:12]}"
    BlobServiceClient.from_connection_string(connection).create_container(container)
    return Root("azure", f"az://{container}/run", {"connection_string": connection})


@pytest.fixture(params=["memory", "gcs", "azure"])
def store_root(request: pytest.FixtureRequest) -> Root:
    if request.param == "memory":
        return Root("memory", f"memory://ckpt-{uuid.uuid4().hex[:12]}/run")
    if request.param == "gcs":
        return gcs_root(request.getfixturevalue("gcs_endpoint"))
    return azure_root(request.getfixturevalue("azurite_connection"))


def test_fake_gcs_server_honours_if_generation_match(gcs_endpoint):
    """What GCSStorage relies on: ifGenerationMatch=0 refuses an existing object, and
    ifGenerationMatch=G refuses an object whose generation is no longer G."""
    from gcsfs.core import GCSFileSystem

    root = gcs_root(gcs_endpoint)
    fs = GCSFileSystem(**root.storage_options, skip_instance_cache=True)
    path = root.url.removeprefix("gs://") + "/m"
    fs.pipe_file(path, b"one", mode="create")
    with pytest.raises(FileExistsError):
        fs.pipe_file(path, b"two", mode="create")
    stale = fs.info(path)["generation"]
    fs.pipe_file(path, b"three")  # someone else replaces it
    storage = open_storage(root.url, root.storage_options)
    with pytest.raises(FileExistsError):
        # The swap GCSStorage.replace_if sends, at the generation it compared: refused (412).
        storage.upload_if_generation(path.split("/", 1)[1], b"four", stale)
    assert fs.cat_file(path) == b"three"


def test_azurite_honours_if_none_match_and_if_match(azurite_connection):
    from azure.core import MatchConditions
    from azure.core.exceptions import ResourceExistsError, ResourceModifiedError
    from azure.storage.blob import BlobServiceClient

    root = azure_root(azurite_connection)
    container = root.url.removeprefix("az://").split("/", 1)[0]
    blob = BlobServiceClient.from_connection_string(azurite_connection).get_blob_client(container, "run/m")
    blob.upload_blob(b"one", overwrite=False)
    with pytest.raises(ResourceExistsError):
        blob.upload_blob(b"two", overwrite=False)  # If-None-Match: *
    stale = blob.get_blob_properties().etag
    blob.upload_blob(b"three", overwrite=True)  # someone else replaces it
    with pytest.raises(ResourceModifiedError):
        blob.upload_blob(b"four", overwrite=True, etag=stale, match_condition=MatchConditions.IfNotModified)
    assert blob.download_blob().readall() == b"three"


def test_create_only_and_compare_and_swap_through_the_backend(store_root):
    storage = open_storage(store_root.url, store_root.storage_options)
    storage.ensure_root(create=True, probe_write=True)
    storage.write_create_only("step/MANIFEST.json", b"one")
    with pytest.raises(FileExistsError, match="already exists"):
        storage.write_create_only("step/MANIFEST.json", b"two")
    storage.replace_if("step/MANIFEST.json", b"three", digest_bytes(b"one"))
    assert storage.read_small("step/MANIFEST.json") == b"three"
    with pytest.raises(FileExistsError, match="changed since it was read"):
        storage.replace_if("step/MANIFEST.json", b"four", digest_bytes(b"one"))  # a stale read
    assert storage.read_small("step/MANIFEST.json") == b"three"


def state_of(value: float) -> dict:
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    return {"model": model, "progress": {"step": int(value)}}


def test_the_manager_saves_restores_replaces_and_never_loads_corruption(store_root, tmp_path):
    log = tmp_path / "events.jsonl"
    mgr = CheckpointManager(store_root.url, storage_options=store_root.storage_options, keep_last=2,
                            event_log=EventLog(log))
    for step in (1, 2, 3):
        mgr.save(step, state_of(float(step)))
    assert sorted(mgr.committed_steps()) == [2, 3]  # retention, on the object store too
    with pytest.raises(CommitConflictError, match="already committed"):
        mgr.save(3, state_of(9.0))
    mgr.allow_replace(3)  # a re-saved step: compare-and-swap of its manifest
    mgr.save(3, state_of(7.0))
    fresh = state_of(0.0)
    assert CheckpointManager(store_root.url, storage_options=store_root.storage_options, read_only=True).restore(fresh) == 3
    assert torch.equal(fresh["model"].weight, torch.full((3, 4), 7.0)) and fresh["progress"]["step"] == 7
    # One flipped byte in step 3's data: the restore refuses it and falls back to step 2.
    storage = open_storage(store_root.url, store_root.storage_options)
    (data,) = [rel for rel in storage.list_tree("") if rel.startswith("step-000000000003/") and rel.endswith(".safetensors")]
    raw = bytearray(storage.read(data).buffer.numpy().tobytes())
    raw[len(raw) // 2] ^= 0xFF
    storage.delete(data)
    storage.write_atomic(data, [memoryview(bytes(raw))], len(raw))
    again = state_of(0.0)
    reader = CheckpointManager(store_root.url, storage_options=store_root.storage_options, read_only=True,
                               event_log=EventLog(log))
    assert reader.restore(again) == 2
    assert torch.equal(again["model"].weight, torch.full((3, 4), 2.0))
    found = [e for e in read_events(log) if e["event"] == "corruption_found"]
    assert found and found[0]["step"] == 3 and "digest mismatch" in found[0]["reason"]


def test_the_lightning_plugin_writes_and_reads_memory_roots():
    pytest.importorskip("lightning")
    from elastic_resume.lightning import ElasticCheckpointIO

    root = f"memory://ckpt-{uuid.uuid4().hex[:12]}/run"
    io = ElasticCheckpointIO()
    io.save_checkpoint({"global_step": 4, "epoch": 0, "state_dict": {"w": torch.ones(2)}}, f"{root}/last.ckpt")
    assert io.resume_path(root) == f"{root}/last.ckpt"
    loaded = io.load_checkpoint(io.resume_path(root))
    assert loaded["global_step"] == 4 and torch.equal(loaded["state_dict"]["w"], torch.ones(2))
    io.remove_checkpoint(f"{root}/last.ckpt")
    assert io.resume_path(root) is None



@pytest.mark.parametrize("backend", ["gcs", "azure"])
def test_a_save_streams_to_gcs_and_azure_in_bounded_parts(request, backend):
    from harness.memory import save_peak_mib

    root = (gcs_root(request.getfixturevalue("gcs_endpoint")) if backend == "gcs"
            else azure_root(request.getfixturevalue("azurite_connection")))
    # Collecting the file first cost about 3x the state (296 MiB for 100 MiB); streamed, a
    # few 8 MiB upload parts. The bound leaves room for allocator noise, not for a copy.
    assert save_peak_mib(root.url, root.storage_options, 64) < 40


@pytest.mark.parametrize("backend", ["gcs", "azure"])
def test_a_streamed_upload_that_fails_leaves_no_object(request, backend):
    from elastic_resume.errors import StorageError
    from elastic_resume.storage import open_storage

    root = (gcs_root(request.getfixturevalue("gcs_endpoint")) if backend == "gcs"
            else azure_root(request.getfixturevalue("azurite_connection")))
    st = open_storage(root.url, root.storage_options)
    part = memoryview(bytes(st.PART_SIZE))
    with pytest.raises(StorageError, match="expected"):
        st.write_atomic("step-000000000001/a/f.ert", [part, part, part], size=4 * st.PART_SIZE)
    assert not st.exists("step-000000000001/a/f.ert")
    # The same upload completed: several parts (one chunk larger than a part) come back whole.
    data = os.urandom(st.PART_SIZE * 2 + 12345)
    chunks = [memoryview(data)[:100], memoryview(data)[100:]]
    written = st.write_atomic("step-000000000001/a/g.ert", chunks, size=len(data))
    back = st.read("step-000000000001/a/g.ert", expected_size=len(data))
    assert written.size == len(data) and back.digest == written.digest == digest_bytes(data)


def test_the_endpoint_probe_stands_aside_behind_a_proxy(monkeypatch):
    from elastic_resume.storage.objectstore import _through_proxy

    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy",
                 "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    assert not _through_proxy("https", "storage.googleapis.com")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert _through_proxy("https", "storage.googleapis.com")  # a direct connection would prove nothing
    monkeypatch.setenv("NO_PROXY", "storage.googleapis.com")
    assert not _through_proxy("https", "storage.googleapis.com")


def test_single_file_lightning_checkpoints_commit_replace_list_and_verify_on_each_store(store_root):
    """What ElasticCheckpointIO does with a ModelCheckpoint path on each object store: a new name
    created only if absent, a path saved again replaced in one upload, the record read from the
    object's tail, a damaged object refused by name and the older checkpoint loaded instead."""
    pytest.importorskip("lightning")
    from elastic_resume.checkpoint.single_file import TAIL_BYTES
    from elastic_resume.collectives import LocalGroup
    from elastic_resume.lightning import ElasticCheckpointIO

    io = ElasticCheckpointIO(storage_options=store_root.storage_options, group=LocalGroup())

    def checkpoint(step: int) -> dict:
        return {"global_step": step, "epoch": 0, "state_dict": {"w": torch.full((64, 64), float(step))}}

    io.save_checkpoint(checkpoint(5), f"{store_root.url}/epoch=0-step=5.ckpt")
    io.save_checkpoint(checkpoint(10), f"{store_root.url}/last.ckpt")
    io.save_checkpoint(checkpoint(12), f"{store_root.url}/last.ckpt")  # saved again: replaced
    assert io.checkpoints(store_root.url) == [(12, f"{store_root.url}/last.ckpt"),
                                              (5, f"{store_root.url}/epoch=0-step=5.ckpt")]
    storage = open_storage(store_root.url, store_root.storage_options)
    with pytest.raises(FileExistsError, match="already exists"):  # what a new name is committed with
        storage.write_create_only("last.ckpt", [memoryview(b"x")])
    tail, size = storage.read_tail("last.ckpt", TAIL_BYTES)
    assert size == len(storage.read_small("last.ckpt", limit=10**7)) and tail.endswith(b"}")
    resume = io.resume_path(store_root.url)
    assert resume == f"{store_root.url}/last.ckpt" and io.load_checkpoint(resume)["global_step"] == 12
    data = bytearray(storage.read_small("last.ckpt", limit=10**7))
    data[len(data) // 2] ^= 0xFF
    storage.delete("last.ckpt")
    storage.write_create_only("last.ckpt", bytes(data))
    loaded = io.load_checkpoint(io.resume_path(store_root.url))
    assert loaded["global_step"] == 5 and torch.equal(loaded["state_dict"]["w"], torch.full((64, 64), 5.0))
