"""The habits that keep the codebase readable, checked on its source: feature packages import only
downwards, one seam per outside world, torch's and Lightning's internals touched in their compat
modules only, event names from the contract, every raised error in the hierarchy."""

from __future__ import annotations

import ast
import builtins
import os
import re

import pytest

from elastic_resume import errors
from harness.processes import REPO

PACKAGE = os.path.join(REPO, "elastic_resume")

# What each part of the package may import (besides itself). Lower layers first; a part never
# imports one that lists it.
ALLOWED = {
    "contract": set(),
    "errors": {"contract"},
    "events": {"contract", "errors"},
    "_torch_compat": {"contract", "errors"},
    "_omegaconf_compat": set(),
    "storage": {"contract", "errors"},
    "collectives": {"errors"},
    "membership": {"collectives", "_torch_compat"},
    "preemption": {"contract"},
    "heartbeat": {"contract"},
    "replicas": set(),
    "metrics": {"contract", "events"},
    "progress": set(),
    "tfevents": set(),
    "training": {"errors", "heartbeat"},
    "checkpoint": {"contract", "errors", "events", "storage", "collectives", "membership", "preemption", "heartbeat",
                   "replicas", "progress", "_torch_compat", "_omegaconf_compat"},
    "spike": {"contract", "errors", "events", "training", "membership", "preemption", "heartbeat", "replicas",
              "_torch_compat"},
    "report": {"contract", "errors", "events", "metrics", "tfevents"},
    "launcher": {"contract", "errors", "events", "storage", "report", "preemption", "heartbeat", "_torch_compat"},
    "lightning": {"contract", "errors", "events", "storage", "collectives", "membership", "checkpoint", "spike", "training",
                  "replicas", "preemption", "heartbeat", "metrics", "_torch_compat"},
    "cli": {"contract", "errors", "events", "storage", "checkpoint", "report", "launcher", "lightning", "progress"},
    "__init__": {"contract", "errors", "events", "checkpoint", "spike", "training"},
}


def modules() -> list[tuple[str, str, ast.Module]]:
    """(part, dotted module name, syntax tree) of every module of the package."""
    found = []
    for dirpath, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, PACKAGE)
                dotted = "elastic_resume." + rel[:-3].replace(os.sep, ".").removesuffix(".__init__")
                part = rel.split(os.sep)[0].removesuffix(".py")
                with open(path) as f:
                    found.append((part, dotted, ast.parse(f.read(), path)))
    return found


def imported(dotted: str, tree: ast.Module) -> set[str]:
    """Absolute names of the modules ``tree`` imports (relative imports resolved)."""
    package = dotted if dotted == "elastic_resume" or dotted.endswith("__init__") else dotted.rsplit(".", 1)[0]
    is_package = os.path.isdir(os.path.join(REPO, *dotted.split(".")))
    base = dotted if is_package else package
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")[: len(base.split(".")) - node.level + 1]
                mod = ".".join(parts + ([node.module] if node.module else []))
                # "from .. import x" imports the module x (or a name of the package: same part)
                out |= {mod} if node.module else {f"{mod}.{a.name}" for a in node.names}
            elif node.module:
                out.add(node.module)
    return out


def part_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "elastic_resume":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def test_each_part_imports_only_the_parts_below_it():
    wrong = []
    for part, dotted, tree in modules():
        for module in imported(dotted, tree):
            target = part_of(module)
            if target is not None and target != part and target not in ALLOWED[part]:
                wrong.append(f"{dotted} imports {module}")
    assert not wrong, "\n".join(sorted(wrong))


def test_only_the_storage_package_talks_to_file_systems_and_object_stores():
    clients = ("fsspec", "s3fs", "gcsfs", "adlfs", "azure", "boto3", "botocore", "aiobotocore")
    wrong = [f"{dotted} imports {m}" for part, dotted, tree in modules() if part != "storage"
             for m in imported(dotted, tree) if m.split(".")[0] in clients]
    assert not wrong, wrong


# Private names of torch and Lightning the code relies on: each must appear in its compat module
# and nowhere else, so one file says what ties us to which release.
TORCH_INTERNALS = ("_remaining_restarts", "_pcontext", "_worker_group", "_get_addr_and_port", "_init_optim_state",
                   "_last_lr", "_actions", "_start_workers", "_monitor_workers", "_restart_workers",
                   "_abort_process_group")
OMEGACONF_INTERNALS = ("grammar_parser", "OmegaConfGrammarParser", "InterpolationResolverContext")
LIGHTNING_INTERNALS = ("_restarting", "_loaded_from_state_dict", "_resuming_from_checkpoint", "_combined_loader",
                       "_data_fetcher", "_last_global_step_saved", "_checkpoint_connector", "_Loop")


@pytest.mark.parametrize("names, home", [(TORCH_INTERNALS, "_torch_compat.py"),
                                         (LIGHTNING_INTERNALS, os.path.join("lightning", "_compat.py")),
                                         (OMEGACONF_INTERNALS, "_omegaconf_compat.py")])
def test_library_internals_are_touched_in_their_compat_module_only(names, home):
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    found_in: dict[str, set[str]] = {}
    for dirpath, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, name), PACKAGE)
                with open(os.path.join(dirpath, name)) as f:
                    for hit in pattern.findall(f.read()):
                        found_in.setdefault(hit, set()).add(rel)
    elsewhere = {name: files - {home} for name, files in found_in.items() if files - {home}}
    assert not elsewhere, elsewhere
    assert set(found_in) == set(names), f"{set(names) - set(found_in)} no longer used: drop them from the list"


def test_every_event_name_comes_from_the_contract():
    literal = []
    for _, dotted, tree in modules():
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("emit", "record") and node.args
                    and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                literal.append(f"{dotted}:{node.lineno} emits {node.args[0].value!r}")
    assert not literal, "use elastic_resume.contract.Event:\n" + "\n".join(literal)


# Raised on purpose but not errors of ours: a programming error, the interpreter's exit, Python's
# own attribute protocol, and the
# storage protocol's own signals (FileExistsError: the precondition did not hold;
# FileNotFoundError: no such file), which the checkpoint store turns into its errors.
NOT_OURS = {"NotImplementedError", "AssertionError", "SystemExit", "KeyboardInterrupt",
            "AttributeError"}  # the last: a module's __getattr__ (PEP 562) says "no such name" so
STORAGE_SIGNALS = {"FileExistsError", "FileNotFoundError"}


def test_every_raised_error_is_defined_in_errors_py():
    builtin_errors = {name for name, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, BaseException)}
    ours = {name for name, v in vars(errors).items() if isinstance(v, type) and issubclass(v, errors.ElasticResumeError)}
    wrong = []
    for part, dotted, tree in modules():
        defined_here = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name):
                name = node.exc.func.id
                allowed = NOT_OURS | (STORAGE_SIGNALS if part == "storage" else set())
                if name in builtin_errors and name not in allowed:
                    wrong.append(f"{dotted}:{node.lineno} raises {name}")
                if name.endswith("Error") and name not in builtin_errors and name not in ours:
                    wrong.append(f"{dotted}:{node.lineno} raises {name}, which errors.py does not define")
                if name in defined_here and name.endswith("Error"):
                    wrong.append(f"{dotted}: defines its own error {name}")
    assert not wrong, "\n".join(wrong)


def test_the_sbatch_script_and_the_cli_state_the_contracts_exit_codes():
    from elastic_resume.cli import build_parser
    from elastic_resume.contract import ExitCode
    from elastic_resume.launcher.slurm import EXAMPLE, render_sbatch

    text = render_sbatch(EXAMPLE)
    assert f"{ExitCode.PREEMPTED} preempted after a committed save" in text and f"{ExitCode.GAVE_UP} gave up" in text
    epilog = build_parser().epilog or ""
    assert f"{ExitCode.PREEMPTED} preempted" in epilog and f"{ExitCode.GAVE_UP} gave up" in epilog


def test_the_command_line_lists_and_verifies_without_importing_torch():
    """ls/latest/verify/inspect/prune start in a fraction of a second: importing the CLI (and the
    store it uses) must not pull in torch, which takes over a second to import."""
    import subprocess
    import sys

    code = ("import sys, elastic_resume.cli, elastic_resume.checkpoint.store; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


def test_the_package_version_is_the_one_pyproject_declares():
    import tomllib

    import elastic_resume

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        assert elastic_resume.__version__ == tomllib.load(f)["project"]["version"]
