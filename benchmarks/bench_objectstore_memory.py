"""Peak memory of one save to an object store, per backend: how much RSS a blocking save of a
100 MiB state adds (``ru_maxrss`` of a fresh process, after building the state, against after
the save), with the local disk beside it as the floor. Streaming uploads keep it near a few
upload parts whatever the shard's size; collecting the file in memory first costs about 3x the
shard.

    python benchmarks/bench_objectstore_memory.py [--mib 100]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness.emulators import azurite, fake_gcs
from harness.memory import save_peak_mib


def measure(url: str, options: dict, mib: int) -> float:
    try:
        return save_peak_mib(url, options, mib)
    except RuntimeError as e:
        raise SystemExit(str(e).splitlines()[-1]) from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=100, help="state size in MiB (default 100)")
    mib = parser.parse_args().mib
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(("local", measure(os.path.join(tmp, "ckpt"), {}, mib)))
    try:
        with fake_gcs() as endpoint:
            from gcsfs.core import GCSFileSystem

            bucket = f"b{uuid.uuid4().hex[:12]}"
            GCSFileSystem(endpoint_url=endpoint, token="anon", skip_instance_cache=True).mkdir(bucket)
            rows.append(("gcs", measure(f"gs://{bucket}/run", {"endpoint_url": endpoint, "token": "anon"}, mib)))
    except ImportError:
        print("fake-gcs-server is not installed: GCS skipped")
    try:
        with azurite() as connection:
            from azure.storage.blob import BlobServiceClient

            container = f"c{uuid.uuid4().hex[:12]}"
            BlobServiceClient.from_connection_string(connection).create_container(container)
            rows.append(("azure", measure(f"az://{container}/run", {"connection_string": connection}, mib)))
    except FileNotFoundError as e:
        print(f"{e}: Azure skipped")
    print(f"peak RSS added by one blocking save of a {mib} MiB state")
    for name, added in rows:
        print(f"  {name:<6} {added:8.1f} MiB   {added / mib:5.2f} x the state")


if __name__ == "__main__":
    main()
