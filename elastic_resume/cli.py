"""The ``elastic-resume`` command line: inspect, verify and prune checkpoint roots.

Exit codes (contract): 0 success; 1 a negative answer (no checkpoint, corruption found);
2 bad usage or an unusable root/flag; 75/76 are reserved for ``launch`` (preempted after a
committed save / gave up). User mistakes get one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from .checkpoint.manifest import Manifest
from .checkpoint.repository import list_bundles
from .checkpoint.store import CheckpointStore
from .checkpoint.verified_reader import StepReport, StepStatus
from .contract import ExitCode
from .errors import CheckpointCorruptError, ConfigError, ElasticResumeError, NoCheckpointError
from .progress import ProgressBar
from .storage import open_storage, redact

EXIT_OK = ExitCode.OK
EXIT_NEGATIVE = ExitCode.NEGATIVE
EXIT_USAGE = ExitCode.USAGE

# Errors that answer the question with "no" rather than signal a usage problem.
_NEGATIVE_ERRORS = (CheckpointCorruptError, NoCheckpointError)


def parse_storage_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs into storage options. Values are JSON-decoded where they parse
    (numbers, true/false, objects), else kept as strings; dotted keys nest
    (``client_kwargs.endpoint_url=http://...``)."""
    options: dict[str, Any] = {}
    for n, pair in enumerate(pairs, start=1):
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            # The text may be a secret typed with the wrong separator: never echo it.
            raise ConfigError(f"--storage-option number {n} is not KEY=VALUE: expected KEY=VALUE (its text is not shown, "
                              "in case it holds a secret)")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        target = options
        parts = key.strip().split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"--storage-option {key!r}: {part!r} is both a value and a group")
        target[parts[-1]] = value
    return options


def _age(created: float | None) -> str:
    if not created:
        return "-"
    s = max(0.0, time.time() - created)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.1f}{unit}"
    return f"{s:.0f}s"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _report_json(r: StepReport) -> dict[str, Any]:
    m = r.manifest
    created = _created(r)
    return {
        "step": r.step,
        "status": r.status,
        "size": r.size,
        "world_size": m.world_size if m else r.record.world_size if r.record else None,
        "created": created,
        "age_s": round(time.time() - created, 1) if created else None,
        "attempt": m.attempt if m else None,
        "problems": [{"file": f, "reason": why} for f, why in r.problems],
    }


def _created(r: StepReport) -> float | None:
    """When the step was saved: its manifest's time, or a single file's record's."""
    return r.manifest.created if r.manifest else r.record.created if r.record else None


def _world(r: StepReport) -> str:
    if r.manifest:
        return str(_training_world(r.manifest))
    return str(r.record.world_size or "-") if r.record else "-"


def _open(args: argparse.Namespace) -> CheckpointStore:
    storage = open_storage(args.root, parse_storage_options(args.storage_option))
    storage.ensure_root(create=False, probe_write=False)
    return CheckpointStore(storage)


def _stores(args: argparse.Namespace) -> list[tuple[str | None, Any]]:
    """``[(None, store)]`` for a checkpoint root; for a Lightning ``ModelCheckpoint`` directory
    (no steps of its own; single-file checkpoints and bundles, ``epoch=0-step=10.ckpt``, in it)
    one ``(name, checkpoint)`` per checkpoint, the one saved last first (what a resume loads,
    see ``ElasticCheckpointIO.resume_path``), then bundles with nothing committed. A single
    file given as ROOT is ``[(name, checkpoint)]``."""
    from .checkpoint.single_file import SingleFile, checkpoint_files

    options = parse_storage_options(args.storage_option)
    root = str(args.root).rstrip("/")
    if _is_file(root, options):
        parent, name = root.rsplit("/", 1) if "/" in root else (".", root)
        return [(name, SingleFile(open_storage(parent, options), name))]
    store = _open(args)
    if store.step_dirs():
        return [(None, store)]
    bundles = list_bundles(store.storage)
    files = [SingleFile(store.storage, rel) for rel in checkpoint_files(root, store.storage)]
    files = [f for f in files if f.ours]  # a plain Lightning file beside them is not ours to judge
    if not bundles and not files:
        return [(None, store)]
    committed = [(name, max(s for s, c in steps.items() if c)) for name, steps in bundles.items() if any(steps.values())]
    created = {name: _manifest_created(store, name, step) for name, step in committed}
    created.update({f.name: f.written_ns() / 1e9 for f in files})
    names = sorted(created, key=lambda n: created[n], reverse=True)
    names += sorted(set(bundles) - set(names))
    by_name: dict[str, Any] = {f.name: f for f in files}
    return [(name, by_name.get(name) or CheckpointStore(open_storage(f"{root}/{name}", options))) for name in names]


def _manifest_created(store: CheckpointStore, name: str, step: int) -> float:
    from .checkpoint.layout import manifest_path

    try:
        rel = f"{name}/{manifest_path(step)}"
        return Manifest.parse(store.storage.read_small(rel), step=step, where=store.storage.display(rel)).created
    except (ElasticResumeError, OSError):
        return -1.0


def _is_file(root: str, options: dict[str, Any]) -> bool:
    """Whether ROOT names one file (a single-file checkpoint), not a directory or prefix. An
    unreachable store is not decided here: opening ROOT reports it."""
    from .checkpoint.single_file import PathKind, path_kind

    try:
        return path_kind(root, options) == PathKind.FILE
    except (ElasticResumeError, OSError):
        return False


def _labelled(bundle: str | None, r: StepReport) -> dict[str, Any]:
    return {"bundle": bundle, **_report_json(r)} if bundle is not None else _report_json(r)


def cmd_ls(args: argparse.Namespace) -> int:
    stores = _stores(args)
    reports = [(bundle, r) for bundle, store in stores for r in store.verify_all(full=args.full)]
    if args.json:
        print(json.dumps([_labelled(b, r) for b, r in reports], indent=1))
        return EXIT_OK
    if not reports:
        print(f"no checkpoints under {stores[0][1].storage.display()}")
        return EXIT_OK
    bundled = stores[0][0] is not None
    width = max((len(b or "") for b, _ in reports), default=0)
    head = f"{'CHECKPOINT':<{width}}  " if bundled else ""
    print(f"{head}{'STEP':>12}  {'STATUS':<10}  {'SIZE':>9}  {'WORLD':>5}  {'AGE':>6}")
    for bundle, r in reports:
        print(
            (f"{bundle:<{width}}  " if bundled else "")
            + f"{r.step:>12}  {r.status:<10}  {_size(r.size):>9}  {_world(r):>5}  {_age(_created(r)):>6}"
        )
    if not args.full:
        print("(STATUS from manifests, records and file sizes: no data was read; 'ls --full' or 'verify' checks "
              "every byte)")
    return EXIT_OK


def _training_world(m: Manifest) -> int:
    """The world size of the run that saved ``m`` as its fingerprint or metadata records it (a
    Lightning bundle is written by global rank 0 alone, a world of one, for a run of any size),
    else the writers'."""
    world = next((section["world_size"] for section in (m.fingerprint, m.metadata)
                  if isinstance(section, dict) and "world_size" in section), None)
    return world if isinstance(world, int) and not isinstance(world, bool) and world > 0 else m.world_size


def cmd_latest(args: argparse.Namespace) -> int:
    """The step a resume would pick; in a ModelCheckpoint directory, the bundle path to pass
    as ``ckpt_path`` (the one ``ElasticCheckpointIO`` would load first)."""
    stores = _stores(args)
    for bundle, store in stores:
        step = store.latest(full=not args.quick)
        if step is not None:
            print(step if bundle is None else f"{str(args.root).rstrip('/')}/{bundle}")
            return EXIT_OK
    print(f"no verified checkpoint under {_open(args).storage.display()}", file=sys.stderr)
    return EXIT_NEGATIVE


def _bar(args: argparse.Namespace, what: str, unit: str = "B") -> ProgressBar:
    """A bar on a terminal, never with ``--json``."""
    return ProgressBar(what, unit=unit, enabled=False if getattr(args, "json", False) else None)


def cmd_verify(args: argparse.Namespace) -> int:
    stores = _stores(args)
    reports: list[tuple[str | None, StepReport]] = []
    for bundle, store in stores:
        if args.step is not None:
            if args.step in store.step_dirs():
                reports.append((bundle, store.verify(args.step, full=not args.quick)))
        else:
            progress = _bar(args, f"verifying {bundle or store.storage.display()}")
            try:
                found = store.verify_all(full=not args.quick, progress=progress)
            finally:
                progress.close()
            reports += [(bundle, r) for r in found if r.status != StepStatus.INCOMPLETE]
    if args.step is not None and not reports:
        print(f"step {args.step} does not exist under {stores[0][1].storage.display()}", file=sys.stderr)
        return EXIT_NEGATIVE
    bad = [r for _, r in reports if not r.ok]
    if args.json:
        print(json.dumps([_labelled(b, r) for b, r in reports], indent=1))
    else:
        for bundle, r in reports:
            name = f"{bundle} step {r.step}" if bundle is not None else f"step {r.step}"
            if r.ok:
                files = len(r.manifest.files) if r.manifest is not None else 1  # None: a single file
                print(f"{name}: OK ({files} file{'s' if files != 1 else ''}, {_size(r.size)})")
            elif r.status == StepStatus.INCOMPLETE:
                print(f"{name}: INCOMPLETE (never committed; resume ignores it)")
            else:
                print(f"{name}: CORRUPT")
                for file, why in r.problems:
                    print(f"  {file}: {why}")
        if not reports:
            print(f"no committed checkpoints under {stores[0][1].storage.display()}")
    return EXIT_NEGATIVE if bad else EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    # In a ModelCheckpoint directory the step lives in a bundle: the one written last that has it.
    stores = _stores(args)
    store = next((s for _, s in stores if args.step in s.committed_steps()), stores[0][1])
    bundle = next((b for b, s in stores if s is store), None)
    report = store.verify(args.step, full=False)
    if report.record is not None:
        return _inspect_file(args, bundle, report)
    if report.manifest is None:
        reasons = "; ".join(f"{f}: {why}" for f, why in report.problems) or "no manifest (never committed)"
        print(f"step {args.step} cannot be inspected: {reasons}", file=sys.stderr)
        return EXIT_NEGATIVE
    m = report.manifest
    body = m.body()
    body["checksum"] = m.checksum
    body["quick_verification"] = {"status": report.status, "problems": [{"file": f, "reason": w} for f, w in report.problems]}
    if args.json:
        print(json.dumps(body, indent=1, sort_keys=True))
        return EXIT_OK if report.ok else EXIT_NEGATIVE
    status = f"{report.status}; data not read: 'verify --step {m.step}' checks every byte" if report.ok else report.status
    if bundle is not None:
        print(f"bundle      {bundle}")
    print(f"step        {m.step}  ({status})")
    print(f"world size  {_training_world(m)}" + (f" (written by {m.world_size})" if _training_world(m) != m.world_size else ""))
    print(f"attempt     {m.attempt}")
    print(f"created     {body['created_iso']} ({_age(m.created)} ago)")
    print(f"size        {_size(m.total_bytes)} in {len(m.files)} files")
    for entry in m.files:
        print(f"  {entry.path}  {_size(entry.size)}  {entry.digest}  rank={entry.rank}")
    return _sections_and_problems(report, (("metadata", m.metadata), ("fingerprint", m.fingerprint),
                                           ("health", m.health)))


def _sections_and_problems(report: StepReport, sections: Sequence[tuple[str, dict[str, Any] | None]]) -> int:
    """The end of ``inspect``: each non-empty section, key by key, then each problem found."""
    for title, section in sections:
        if section:
            print(f"{title}:")
            for k, v in sorted(section.items()):
                print(f"  {k}: {json.dumps(v) if not isinstance(v, str) else v}")
    for f, why in report.problems:
        print(f"PROBLEM {f}: {why}")
    return EXIT_OK if report.ok else EXIT_NEGATIVE


def _inspect_file(args: argparse.Namespace, name: str | None, report: StepReport) -> int:
    """``inspect`` of a single-file Lightning checkpoint: its integrity record."""
    record = report.record
    body = {"file": name, "step": record.step, "size": record.size, "digest": record.digest,
            "created": record.created, "created_iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created)),
            "world_size": record.world_size, "metadata": record.metadata, "health": record.health,
            "quick_verification": {"status": report.status,
                                   "problems": [{"file": f, "reason": w} for f, w in report.problems]}}
    if args.json:
        print(json.dumps(body, indent=1, sort_keys=True))
        return EXIT_OK if report.ok else EXIT_NEGATIVE
    status = f"{report.status}; data not read: 'verify' checks every byte" if report.ok else report.status
    print(f"file        {name}")
    print(f"step        {record.step}  ({status})")
    print(f"world size  {record.world_size or '-'} (written by 1)")
    print(f"created     {body['created_iso']} ({_age(record.created)} ago)")
    print(f"size        {_size(record.size)} in 1 file  {record.digest}")
    return _sections_and_problems(report, (("metadata", record.metadata), ("health", record.health)))


def cmd_prune(args: argparse.Namespace) -> int:
    store = _open(args)
    bars = {"verifying": _bar(args, f"verifying the newest {args.keep}"),
            "deleting": _bar(args, "deleting", unit="step")}
    try:
        plan = store.prune(keep_last=args.keep, keep_every=args.keep_every, dry_run=args.dry_run,
                           lock_timeout=args.lock_timeout, progress=lambda phase, done, total: bars[phase](done, total))
    finally:
        for bar in bars.values():
            bar.close()
    verb = "would delete" if args.dry_run else "deleted"
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, "deleted": plan.delete, "incomplete_deleted": plan.delete_incomplete,
                          "kept": {str(k): v for k, v in plan.keep.items()}}, indent=1))
        return EXIT_OK
    for s in plan.delete:
        print(f"{verb} step {s}")
    for s in plan.delete_incomplete:
        print(f"{verb} incomplete step {s}")
    for s, why in sorted(plan.keep.items(), reverse=True):
        print(f"kept step {s} ({why})")
    return EXIT_OK


def _export_target(output: str) -> str:
    if output.endswith(("/", os.sep)) or os.path.isdir(output):
        raise ConfigError(f"export: {output} is a directory; give the file to write "
                          f"(e.g. {output.rstrip('/')}/model.safetensors)")
    out = os.path.abspath(output)
    if not os.path.isdir(os.path.dirname(out)):
        raise ConfigError(f"export: directory {os.path.dirname(out)} does not exist")
    if os.path.lexists(out):
        raise ConfigError(f"{out} already exists; export never replaces a file (remove it or pick another name)")
    return out


def cmd_export(args: argparse.Namespace) -> int:
    """The model weights of a verified step as one file (safetensors, a torch state dict, or a
    Lightning ``.ckpt``), consolidated from replicated and sharded state."""
    from .checkpoint import export
    from .checkpoint.single_file import SingleFile

    out = _export_target(args.output)
    fmt = export.format_for(args.output, args.format)
    stores = _stores(args)
    if len(stores) == 1 and isinstance(stores[0][1], SingleFile):  # a single-file Lightning checkpoint
        if args.step is not None:
            raise ConfigError(f"export: --step does not apply to {args.root}, a single checkpoint file")
        single = stores[0][1]
        progress = _bar(args, f"writing {os.path.basename(out)}")
        try:
            done = export.export_file(single.storage, single.name, out, fmt=fmt, dtype=args.dtype, key=args.key,
                                      progress=progress)
        finally:
            progress.close()
        print(f"exported step {done.step} of {single.storage.display(single.name)} to {out} ({done.tensors} "
              f"tensors of {done.key!r}, {_size(done.size)}, {done.note})")
        return EXIT_OK
    if stores[0][0] is not None:
        raise ConfigError(f"export: {args.root} holds Lightning checkpoints ({', '.join(b or '' for b, _ in stores[:4])}); "
                          "give the one to export")
    store = stores[0][1]
    progress = _bar(args, f"writing {os.path.basename(out)}")
    try:
        done = export.export(store, out, fmt=fmt, step=args.step, dtype=args.dtype, key=args.key, progress=progress)
    finally:
        progress.close()
    print(f"exported step {done.step} of {store.storage.display()} to {out} ({done.tensors} tensors of "
          f"{done.key!r}, {_size(done.size)}, {done.note})")
    return EXIT_OK


def _nonneg_int(flag: str):  # type: ignore[no-untyped-def]
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} expects an integer, got {text!r}") from None
        if v < 0:
            raise argparse.ArgumentTypeError(f"{flag} must not be negative, got {v}")
        return v

    return parse


def _pos_int(flag: str):  # type: ignore[no-untyped-def]
    def parse(text: str) -> int:
        v = _nonneg_int(flag)(text)
        if v < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be at least 1, got {v}")
        return v

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="elastic-resume",
        description="Launch resumable training; inspect, verify and prune its checkpoints (roots: a local path, file://, "
        "s3://, gs://, az:// (abfs://) or memory://).",
        epilog=f"Exit codes: {ExitCode.OK} ok, {ExitCode.NEGATIVE} none found or corruption found, {ExitCode.USAGE} bad "
        f"usage or root, {ExitCode.PREEMPTED} preempted after a committed save (requeue), {ExitCode.GAVE_UP} gave up "
        f"(do not retry), {ExitCode.PERMANENT} an error no restart can heal (do not retry).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log structured events to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("root", metavar="ROOT", help="checkpoint root: a directory, file://, s3://, gs://, az:// (abfs://) or "
                       "memory:// bucket/prefix")
        p.add_argument(
            "--storage-option", action="append", default=[], metavar="KEY=VALUE",
            help="storage option passed to the backend (repeatable), e.g. endpoint_url=http://127.0.0.1:9000",
        )
        return p

    p = add("ls", "list steps with status (committed|incomplete|corrupt), size, world size and age")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--full", action="store_true", help="verify digests too (reads every byte)")
    p.set_defaults(func=cmd_ls)

    p = add("latest", "print the step a resume would pick; exit 1 if none")
    p.add_argument("--quick", action="store_true", help="check presence and sizes only, not digests")
    p.set_defaults(func=cmd_latest)

    p = add("verify", "verify committed steps; exit 1 naming each bad file")
    p.add_argument("--step", type=_nonneg_int("--step"), help="verify only this step")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--quick", action="store_true", help="check presence and sizes only, not digests")
    p.set_defaults(func=cmd_verify)

    p = add("inspect", "show a step's manifest: files, sizes, fingerprint, metadata")
    p.add_argument("step", metavar="STEP", type=_nonneg_int("STEP"))
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)

    help = "summarize a run from its event logs: restarts, rollbacks, preemptions, goodput"
    p = sub.add_parser("report", help=help, description=help)
    p.add_argument("paths", metavar="PATH", nargs="+", help="event log files or directories of *.jsonl")
    p.add_argument("--plot", metavar="PNG", help="also draw the loss curve with restarts and rollbacks marked")
    p.add_argument("--tensorboard", metavar="DIR", help="also write the loss and the recovery metrics (rollbacks, "
                                                        "restarts, skipped samples, ...) as TensorBoard scalars in DIR")
    p.add_argument("--json", action="store_true", help="print JSON")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--run-id", help="report this run of the logs (default: the newest, saying so when there are more)")
    which.add_argument("--all-runs", action="store_true", help="merge every run in the logs into one report")
    p.set_defaults(func=cmd_report)

    help = "print an sbatch script that runs 'elastic-resume launch' on every node, with requeue on preemption"
    p = sub.add_parser("sbatch", help=help, description=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--job-name", default="train")
    p.add_argument("--nodes", type=_pos_int("--nodes"), default=2)
    p.add_argument("--min-nodes", type=_pos_int("--min-nodes"), help="go on with this many nodes after a node failure")
    p.add_argument("--gpus-per-node", type=_nonneg_int("--gpus-per-node"),
                   help="GPUs to request per node (default: what every node of this cluster offers, from sinfo; "
                        "none on a CPU cluster); 0 requests none")
    p.add_argument("--nproc-per-node", type=_pos_int("--nproc-per-node"),
                   help="workers per node (default: one per GPU requested, else 1)")
    p.add_argument("--cpus-per-task", type=_pos_int("--cpus-per-task"))
    p.add_argument("--time", default="24:00:00", help="the job's time limit")
    p.add_argument("--signal-lead", type=_pos_int("--signal-lead"), default=300,
                   help="seconds before the time limit Slurm sends USR1 (shorter than --time)")
    p.add_argument("--grace", type=_pos_int("--grace"), help="seconds the workers get to save (default: lead minus 20%%)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("-o", "--output", "--log", dest="log", default="%x-%j.out",
                   help="the job's log, as sbatch -o (appended across requeues); a directory in it is created now")
    p.add_argument("--rdzv-port", type=_pos_int("--rdzv-port"),
                   help="a fixed rendezvous port (default: one per job, 30000 + job id %% 10000)")
    p.add_argument("--launcher", default="elastic-resume", help="command that runs elastic-resume on the nodes")
    p.add_argument("--setup", action="append", default=[], help="shell line run before srun (repeatable)")
    p.add_argument("--write", metavar="FILE", help="write the script to FILE instead of stdout")
    p.add_argument("script", metavar="SCRIPT")
    p.add_argument("script_args", metavar="ARGS", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_sbatch)

    sub.add_parser("launch", help="run a training script like torchrun, with resume, preemption and requeue "
                                  "(takes torchrun's flags; see 'elastic-resume launch --help')")
    sub.add_parser("doctor", help="show what 'launch' detects here (Slurm, Kubernetes) and what it would run")

    p = add("export", "write the model weights of a verified step as one file: safetensors, torch or Lightning "
                      "(consolidated from replicated and sharded state)")
    p.add_argument("output", metavar="OUT", help="the file to write (must not exist); its suffix picks the format: "
                                                 ".safetensors, .pt/.pth/.bin (torch), .ckpt (lightning)")
    p.add_argument("--format", choices=["safetensors", "torch", "lightning"],
                   help="safetensors: for inference and Hugging Face; torch: a state dict for torch.load(weights_only=True); "
                        "lightning: what LightningModule.load_from_checkpoint reads")
    p.add_argument("--step", type=_nonneg_int("--step"), help="the step to export (default: the newest loadable)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="cast floating-point weights (default: as saved)")
    p.add_argument("--key", help="the state entry holding the model (default: a Lightning bundle's state_dict, "
                                 "else 'model', 'state_dict', 'module' or 'net')")
    p.set_defaults(func=cmd_export)

    p = add("prune", "delete old checkpoints, keeping the newest N (and milestones)")
    p.add_argument("--keep", type=_pos_int("--keep"), required=True, help="number of newest committed steps to keep")
    p.add_argument("--keep-every", type=_pos_int("--keep-every"), help="also keep steps divisible by this")
    p.add_argument("--dry-run", action="store_true", help="only print what would be deleted")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--lock-timeout", type=_nonneg_int("--lock-timeout"), default=10, metavar="S",
                   help="seconds to wait for another prune of this root to finish (default 10)")
    p.set_defaults(func=cmd_prune)
    return parser


def cmd_report(args: argparse.Namespace) -> int:
    from .report import load_events, plot, summarize, tensorboard, well_formed

    logs = load_events(args.paths)
    notes = [f"not an event log, skipped: {f}" for f in logs.not_event_logs]
    if not logs.events:
        raise ConfigError(f"no events in {', '.join(args.paths)}" + (
            f" ({len(logs.not_event_logs)} *.jsonl file(s) hold no event lines)" if logs.not_event_logs else ""))
    events, runs = logs.events, logs.runs
    if args.run_id is not None:
        if args.run_id not in runs:
            raise ConfigError(f"--run-id {args.run_id}: no such run in these logs (they hold {', '.join(runs) or 'none'})")
        events = logs.of_run(args.run_id)
    elif len(runs) > 1 and not args.all_runs:
        newest = max(runs, key=lambda r: runs[r][1])
        events = logs.of_run(newest)
        notes.append(f"these logs hold {len(runs)} runs ({', '.join(runs)}); reporting the newest, {newest} "
                     "(--run-id ID for another, --all-runs to merge them)")
    elif len(runs) > 1:
        notes.append(f"merging {len(runs)} runs: {', '.join(runs)}")
    summary = summarize(events)
    events = [e for e in events if well_formed(e)]
    if args.json:
        print(json.dumps({**summary.as_dict(), "notes": notes}, indent=2))
    else:
        print(summary.text())
        for note in notes:
            print(f"  note: {note}")
    if args.plot:
        plot(events, summary, args.plot)
        if not args.json:
            print(f"  {'plot':<18} {args.plot}")
    if args.tensorboard:
        written = tensorboard(events, summary, args.tensorboard)
        if not args.json:
            print(f"  {'tensorboard':<18} {written}")
    return EXIT_OK


def cmd_sbatch(args: argparse.Namespace) -> int:
    from .launcher.slurm import SbatchOptions, cluster_gpus_per_node, render_sbatch

    if args.log.endswith((".sbatch", ".sh")):
        raise ConfigError(f"-o {args.log}: -o is the job's log, as in sbatch; write the script with --write {args.log}")
    gpus = args.gpus_per_node if args.gpus_per_node is not None else cluster_gpus_per_node()
    text = render_sbatch(SbatchOptions(
        script=args.script, script_args=tuple(args.script_args), job_name=args.job_name, nodes=args.nodes,
        min_nodes=args.min_nodes, nproc_per_node=args.nproc_per_node or gpus or 1, gpus_per_node=gpus or None,
        cpus_per_task=args.cpus_per_task, time=args.time, signal_lead_s=args.signal_lead, grace_s=args.grace,
        partition=args.partition, account=args.account, output=args.log, rdzv_port=args.rdzv_port,
        launcher=args.launcher, setup=tuple(args.setup),
    ))
    # Slurm opens the log before the script runs: a missing directory fails the job with no log.
    log_dir = os.path.dirname(args.log)
    if log_dir and "%" not in log_dir and not os.path.isdir(log_dir):
        try:
            os.makedirs(log_dir)
        except OSError as e:
            raise ConfigError(f"-o {args.log}: cannot create the log's directory {log_dir}: {e.strerror or e}") from None
        print(f"created {log_dir}/ for the job's log (Slurm does not create it)", file=sys.stderr)
    if args.write:
        try:
            with open(args.write, "w") as f:
                f.write(text)
        except OSError as e:
            raise ConfigError(f"--write {args.write}: cannot write the script: {e.strerror or e}") from None
    else:
        sys.stdout.write(text)
    return EXIT_OK


# Commands that take torchrun's flags, parsed by torchrun's own parser (see launcher.py).
_PASSTHROUGH = ("launch", "doctor")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _PASSTHROUGH:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        from .launcher import launch

        return launch.main(argv[1:]) if argv[0] == "launch" else launch.doctor(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.ERROR,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:  # storage clients log their retries' tracebacks; our one line says it
        for name in ("gcsfs", "s3fs", "adlfs", "aiohttp", "azure", "botocore", "fsspec", "urllib3"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    for stream in (sys.stdout, sys.stderr):  # a root name that is not UTF-8 is printed, escaped
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    try:
        return int(args.func(args))
    except ElasticResumeError as e:
        print(f"elastic-resume {args.command}: {_one_line(e, args)}", file=sys.stderr)
        return EXIT_USAGE if not isinstance(e, _NEGATIVE_ERRORS) else EXIT_NEGATIVE
    except OSError as e:  # the file system refused something (permissions, a full or read-only disk)
        print(f"elastic-resume {args.command}: {_one_line(e, args)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def _one_line(e: BaseException, args: argparse.Namespace) -> str:
    """An error as the one line the CLI prints: credentials of the storage options given (and of
    the environment, and anything shaped like one) removed, whatever path raised it."""
    try:
        opts = parse_storage_options(getattr(args, "storage_option", None) or [])
    except ConfigError:
        opts = {}
    text = " ".join(str(e).split()) or type(e).__name__
    return redact(text, opts)


if __name__ == "__main__":
    sys.exit(main())
