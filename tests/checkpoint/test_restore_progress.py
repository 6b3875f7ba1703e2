"""A restore of a large step draws a progress bar on a terminal (rank 0, stdout and stderr a
terminal), and nothing into a pipe or for a small step."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

from elastic_resume import CheckpointManager
from elastic_resume.progress import RESTORE_BAR_BYTES
from harness.processes import child_env
from tests.helpers.terminal import through_a_terminal


def test_a_large_restore_draws_a_bar_on_a_terminal_only(tmp_path):
    root = str(tmp_path / "ckpt")
    CheckpointManager(root).save(1, {"big": torch.zeros(RESTORE_BAR_BYTES // 4 + 1024)})
    CheckpointManager(str(tmp_path / "small")).save(1, {"big": torch.zeros(1024)})
    script = tmp_path / "restore.py"
    script.write_text(textwrap.dedent("""
        import sys
        from elastic_resume import CheckpointManager
        print("restored", CheckpointManager(sys.argv[1]).restore({"big": None}))
    """))
    drawn = through_a_terminal(sys.executable, str(script), root)
    assert "restoring step 1" in drawn and "%|" in drawn and "restored 1" in drawn
    small = through_a_terminal(sys.executable, str(script), str(tmp_path / "small"))
    assert "restoring" not in small and "restored 1" in small
    piped = subprocess.run([sys.executable, str(script), root], capture_output=True, text=True, env=child_env(),
                           timeout=120)
    assert piped.returncode == 0 and "restoring" not in piped.stderr + piped.stdout
    assert os.path.isdir(root)
