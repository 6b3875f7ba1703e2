"""A real etcd server on 127.0.0.1 for the rendezvous tests and benchmarks: Debian's ``etcd-server``
(``make test`` installs it), one member, its own data directory, the v2 API on (torch's ``etcd-v2``
rendezvous speaks it), stopped by PID."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

from harness.processes import free_port, stop_process


def missing_reason() -> str | None:
    """Why an etcd test cannot run here, or None."""
    if shutil.which("etcd") is None:
        return "etcd is not installed (apt-get install etcd-server; scripts/install-services.sh does)"
    try:
        import etcd  # noqa: F401 - torch's etcd-v2 rendezvous imports it
    except ImportError:
        return "python-etcd is not installed (pip install 'elastic-resume[etcd]')"
    return None


@dataclass
class Etcd:
    proc: subprocess.Popen[Any]
    port: int
    data_dir: str

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_process(self.proc)
        shutil.rmtree(self.data_dir, ignore_errors=True)


def start_etcd(log_path: str) -> Etcd:
    client, peer = free_port(), free_port()
    data = tempfile.mkdtemp(prefix="er-etcd-")
    cmd = ["etcd", "--name", "er", "--data-dir", os.path.join(data, "member"), "--enable-v2=true",
           "--listen-client-urls", f"http://127.0.0.1:{client}", "--advertise-client-urls", f"http://127.0.0.1:{client}",
           "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
           "--initial-cluster", f"er=http://127.0.0.1:{peer}", "--log-outputs", "stderr"]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = Etcd(proc, client, data)
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{client}/version", timeout=1) as r:
                json.load(r)
            return server
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"etcd did not start (exit {proc.poll()}); see {log_path}") from None
            time.sleep(0.1)
