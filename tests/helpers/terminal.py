"""Running a command on a pseudo-terminal, as a person watching would."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import termios

from harness.processes import child_env


def through_a_terminal(*cmd: str, env: dict[str, str] | None = None) -> str:
    """Run ``cmd`` with stdout and stderr on a pseudo-terminal; everything it drew."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal 100 wide
    proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=follower, stderr=follower,
                            env=child_env(env))
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the terminal's other side closed
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    assert proc.wait(timeout=60) == 0
    return out.decode(errors="replace")
