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
from torch.futures import Future
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult

from .errors import CheckpointCorruptError
from .serialization import as_cpu_contiguous, decode, encode
from .store import CheckpointStore, FileEntry, Manifest, data_file, step_dir

DCP_META = "dcp-metadata.json"


class StoreWriter(StorageWriter):
    """Writes this rank's DCP items as one data file; the coordinator keeps the metadata."""

    def __init__(self, store: CheckpointStore, step: int, attempt: str, rank: int) -> None:
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
        rel = data_file(self.attempt, self.rank, "dcp")
        tensors: dict[int, torch.Tensor] = {}
        results = []
        for i, item in enumerate(plan.items):
            if item.type == WriteItemType.BYTE_IO:
                raise TypeError(f"non-tensor item {item.index.fqn} reached the sharded path")
            t = as_cpu_contiguous(planner.resolve_data(item).detach())  # type: ignore[union-attr]
            tensors[i] = t
            results.append(WriteResult(index=item.index, size_in_bytes=t.numel() * t.element_size(),
                                       storage_data={"file": rel, "tensor": i}))
        entry = self.store.write_file(self.step, rel, encode({"skeleton": None, "tensors": tensors}), rank=self.rank)
        self.entries.append(FileEntry(entry.path, entry.size, entry.digest, self.rank, "dcp"))
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        doc = metadata_to_json(metadata, [r for rank_results in results for r in rank_results])
        data = json.dumps(doc, separators=(",", ":")).encode()
        rel = f"{self.attempt}/{DCP_META}"
        entry = self.store.write_file(self.step, rel, _Bytes(data), rank=self.rank)
        self.entries.append(FileEntry(entry.path, entry.size, entry.digest, self.rank, "dcp-meta"))

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=f"{step_dir(self.step)}/{self.attempt}")

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return True


class StoreReader(StorageReader):
    """Reads DCP items from a committed step, verifying each file's digest as it is read."""

    def __init__(self, store: CheckpointStore, manifest: Manifest) -> None:
        super().__init__()
        self.store, self.manifest = store, manifest
        self.storage_data: dict[MetadataIndex, dict[str, Any]] = {}

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        entry = next(f for f in self.manifest.files if f.kind == "dcp-meta")
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
        entries = {f.path: f for f in self.manifest.files if f.kind == "dcp"}
        for rel, reqs in by_file.items():
            if rel not in entries:
                raise CheckpointCorruptError(self.manifest.step, rel, "sharded data file not listed in the manifest")
            where = self.store.storage.display(f"{step_dir(self.manifest.step)}/{rel}")
            buf = self.store.read_file(self.manifest, entries[rel])
            tensors = decode(buf, where=where)["tensors"]
            for req in reqs:
                t = tensors[self.storage_data[req.storage_index]["tensor"]]
                for dim, (offset, length) in enumerate(zip(req.storage_offsets, req.lengths)):
                    t = t.narrow(dim, offset, length)
                target = planner.resolve_tensor(req).detach()
                if target.size() != t.size():
                    raise CheckpointCorruptError(self.manifest.step, where,
                                                 f"shard of {req.storage_index.fqn} has shape {tuple(t.size())}, expected {tuple(target.size())}")
                target.copy_(t)
                planner.commit_tensor(req, target)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return True


class _Bytes:
    """Adapts a bytes payload to what CheckpointStore.write_file expects of an encoded file."""

    def __init__(self, data: bytes) -> None:
        self.data, self.size = data, len(data)

    def chunks(self) -> Any:
        yield memoryview(self.data)


def metadata_to_json(metadata: Metadata, results: list[WriteResult]) -> dict[str, Any]:
    sd = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            raise TypeError(f"{fqn}: only tensors are saved through the sharded path")
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
            raise TypeError("not a JSON object")
        return metadata_from_json(doc)
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError, AttributeError, IndexError, RuntimeError) as e:
        raise CheckpointCorruptError(step, where, f"malformed sharded-state metadata: {type(e).__name__}: {str(e)[:200]}") from None


def metadata_from_json(doc: dict[str, Any]) -> Metadata:
    from .serialization import _DTYPES

    if doc.get("version") != 1:
        raise ValueError(f"unknown sharded metadata version {doc.get('version')!r}")
    sd = {
        fqn: TensorStorageMetadata(
            properties=TensorProperties(dtype=_DTYPES[m["dtype"]]),
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
    place, so the targets must exist). Uses the same helper DCP's own state_dict API uses."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    for value in state.values():
        if isinstance(value, torch.optim.Optimizer) and not value.state:
            params = [p for g in value.param_groups for p in g["params"]]
            if any(type(p).__name__ == "DTensor" for p in params):
                _init_optim_state(value)
