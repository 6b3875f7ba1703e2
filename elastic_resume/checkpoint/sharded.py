"""Sharded state (FSDP2 / DTensor) through ``torch.distributed.checkpoint`` behind our commit
protocol.

DCP's planners decide who writes which shard and how shards map onto a different sharding on
load (so a checkpoint saved at 4 ranks loads at 2). Its bytes go through our store like every
other data file: one file per rank in our tensor format (no pickle), each hashed while written
and listed in the manifest; DCP's metadata is written as JSON, not pickled, and listed too. Only
DTensor leaves travel this way; everything else in the state keeps the ordinary path.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from .. import _torch_compat
from ..errors import CheckpointCorruptError, StateError
from .format import DTYPES, as_cpu_contiguous, decode, encode
from .layout import FileKind, data_file, step_dir
from .manifest import FileEntry, Manifest

if TYPE_CHECKING:
    from .verified_reader import StepReader

DCP_META = "dcp-metadata.json"


class StoreWriter(StorageWriter):
    """Writes this rank's DCP items as one data file; the coordinator keeps the metadata."""

    def __init__(self, store: StepReader, step: int, attempt: str, rank: int) -> None:
        super().__init__()
        self.store, self.step, self.attempt, self.rank = store, step, attempt, rank
        self.entries: list[FileEntry] = []
        self.is_coordinator = False

    def reset(self, checkpoint_id: Any = None) -> None:
        self.entries = []

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return plans

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        rel = data_file(self.attempt, self.rank, FileKind.DCP)
        tensors: dict[int, torch.Tensor] = {}
        results = []
        for i, item in enumerate(plan.items):
            if item.type == WriteItemType.BYTE_IO:
                raise StateError(f"{item.index.fqn}: only tensors are saved through the sharded (DTensor) path")
            data = planner.resolve_data(item)
            if not isinstance(data, torch.Tensor):
                raise StateError(f"{item.index.fqn}: only tensors are saved through the sharded (DTensor) path")
            t = as_cpu_contiguous(data.detach())
            tensors[i] = t
            results.append(WriteResult(index=item.index, size_in_bytes=t.numel() * t.element_size(),
                                       storage_data={"file": rel, "tensor": i}))
        entry = self.store.write_file(self.step, rel, encode({"skeleton": None, "tensors": tensors}), rank=self.rank)
        self.entries.append(FileEntry(entry.path, entry.size, entry.digest, self.rank, FileKind.DCP))
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        doc = metadata_to_json(metadata, [r for rank_results in results for r in rank_results])
        data = json.dumps(doc, separators=(",", ":")).encode()
        rel = f"{self.attempt}/{DCP_META}"
        entry = self.store.write_file(self.step, rel, _Bytes(data), rank=self.rank)
        self.entries.append(FileEntry(entry.path, entry.size, entry.digest, self.rank, FileKind.DCP_META))

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=f"{step_dir(self.step)}/{self.attempt}")

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return True


class StoreReader(StorageReader):
    """Reads DCP items from a committed step, verifying each file's digest as it is read."""

    def __init__(self, store: StepReader, manifest: Manifest) -> None:
        super().__init__()
        self.store, self.manifest = store, manifest
        self.storage_data: dict[MetadataIndex, dict[str, Any]] = {}

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        entry = self.manifest.files_of(FileKind.DCP_META)[0]
        buf = self.store.read_file(self.manifest, entry)
        assert buf is not None
        return parse_metadata(bytes(buf.numpy().tobytes()), step=self.manifest.step, where=entry.path)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        by_file: dict[str, list[Any]] = {}
        for req in plan.items:
            by_file.setdefault(self.storage_data[req.storage_index]["file"], []).append(req)
        entries = {f.path: f for f in self.manifest.files_of(FileKind.DCP)}
        for rel, reqs in by_file.items():
            if rel not in entries:
                raise CheckpointCorruptError(self.manifest.step, rel, "sharded data file not listed in the manifest")
            where = self.store.storage.display(f"{step_dir(self.manifest.step)}/{rel}")
            buf = self.store.read_file(self.manifest, entries[rel])
            assert buf is not None  # read_file keeps the bytes by default
            tensors = decode(buf, where=where)["tensors"]
            for req in reqs:
                t = tensors[self.storage_data[req.storage_index]["tensor"]]
                for dim, (offset, length) in enumerate(zip(req.storage_offsets, req.lengths)):
                    t = t.narrow(dim, offset, length)
                target = planner.resolve_tensor(req).detach()
                if target.size() != t.size():
                    raise CheckpointCorruptError(self.manifest.step, where, f"shard of {req.storage_index.fqn} has shape "
                                                 f"{tuple(t.size())}, expected {tuple(target.size())}")
                target.copy_(t)
                planner.commit_tensor(req, target)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return True


class _Bytes:
    """A bytes payload in the form ``StepRepository.write_file`` takes (``format.Payload``)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.size = data, len(data)

    def chunks(self) -> Iterator[memoryview]:
        yield memoryview(self.data)


def metadata_to_json(metadata: Metadata, results: list[WriteResult]) -> dict[str, Any]:
    sd = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            raise StateError(f"{fqn}: only tensors are saved through the sharded (DTensor) path")
        sd[fqn] = {
            "dtype": str(md.properties.dtype).removeprefix("torch."),
            "size": list(md.size),
            "chunks": [[list(c.offsets), list(c.sizes)] for c in md.chunks],
        }
    storage = [[r.index.fqn, list(r.index.offset) if r.index.offset is not None else None, r.storage_data]
               for r in results]
    return {"version": 1, "state_dict": sd, "storage": storage}


def parse_metadata(data: bytes, *, step: int, where: str) -> Metadata:
    """The sharded index from its file's bytes (untrusted: every failure is corruption)."""
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict):
            raise CheckpointCorruptError(step, where, "malformed sharded-state metadata: not a JSON object")
        return metadata_from_json(doc)
    except CheckpointCorruptError as e:
        raise CheckpointCorruptError(step, where, e.reason) from None
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError, AttributeError, IndexError, RuntimeError) as e:
        why = f"malformed sharded-state metadata: {type(e).__name__}: {str(e)[:200]}"
        raise CheckpointCorruptError(step, where, why) from None


def metadata_from_json(doc: dict[str, Any]) -> Metadata:
    """The inverse of :func:`metadata_to_json`; any failure on hostile input is caught by
    :func:`parse_metadata` and reported as corruption."""
    if doc.get("version") != 1:
        raise CheckpointCorruptError(None, None, f"unknown sharded metadata version {str(doc.get('version'))[:40]!r}")
    sd: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {
        fqn: TensorStorageMetadata(
            properties=TensorProperties(dtype=DTYPES[m["dtype"]]),
            size=torch.Size(m["size"]),
            chunks=[ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(s)) for o, s in m["chunks"]],
        )
        for fqn, m in doc["state_dict"].items()
    }
    storage = {
        MetadataIndex(fqn=fqn, offset=torch.Size(off) if off is not None else None): info
        for fqn, off, info in doc["storage"]
    }
    return Metadata(state_dict_metadata=sd, storage_data=storage)


def save_sharded(sharded: dict[str, torch.Tensor], writer: StoreWriter, process_group: Any) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(sharded, storage_writer=writer, process_group=process_group)


def load_sharded(targets: dict[str, torch.Tensor], reader: StoreReader, process_group: Any) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.load(targets, storage_reader=reader, process_group=process_group)


def init_optimizer_states(state: dict[str, Any]) -> None:
    """Give optimizers over sharded parameters their state tensors before a load (DCP loads in
    place, so the targets must exist)."""
    for value in state.values():
        if isinstance(value, torch.optim.Optimizer) and not value.state:
            params = [p for g in value.param_groups for p in g["params"]]
            if any(type(p).__name__ == "DTensor" for p in params):
                _torch_compat.init_optimizer_state(value)


def local_shard(dt: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (what a background save stages)."""
    from torch.distributed.tensor import DTensor

    assert isinstance(dt, DTensor)
    return dt.to_local()


def restage_dtensor(dt: torch.Tensor, local_copy: torch.Tensor) -> torch.Tensor:
    """The same DTensor (mesh, placements, global shape) over a staged copy of its local shard."""
    from torch.distributed.tensor import DTensor

    assert isinstance(dt, DTensor)
    return DTensor.from_local(local_copy, dt.device_mesh, dt.placements, run_check=False,
                              shape=dt.shape, stride=dt.stride())
