"""``gs://bucket/prefix`` through gcsfs's JSON-API client."""

from __future__ import annotations

import errno
from typing import Any

from .objectstore import FsspecStorage, open_fs, precondition_failed
from .protocol import digest_bytes


class GCSStorage(FsspecStorage):
    """``gs://bucket/prefix`` through gcsfs (``STORAGE_EMULATOR_HOST`` or ``endpoint_url`` for an
    emulator). Create-only: ``ifGenerationMatch=0``; compare-and-swap: ``ifGenerationMatch`` on
    the generation whose bytes were compared."""

    scheme = "gs"

    def __init__(self, url: str, options: dict[str, Any]) -> None:
        # The plain JSON-API client: gcsfs's default class first asks a gRPC control plane for
        # the bucket's layout, which an emulator (and a firewall) does not answer for a minute.
        from gcsfs.core import GCSFileSystem

        # Any failure to build the client from the options (a malformed token: a path that is not
        # a credentials file, a dict google-auth refuses) is a mistake in those options.
        fs = open_fs(GCSFileSystem, options, what="GCS", bad=(Exception,))
        super().__init__("gs://" + url.split("://", 1)[1], options, fs)

    def endpoint(self) -> str | None:
        import os

        return (self.options.get("endpoint_url") or os.environ.get("STORAGE_EMULATOR_HOST")
                or "https://storage.googleapis.com")

    def replace_if(self, rel: str, data: bytes, expected_digest: str) -> None:
        path = self._p(rel)
        try:
            generation = self.fs.info(path)["generation"]
            current = self.fs.cat_file(path)
            same = self.fs.info(path)["generation"] == generation  # the bytes read are that generation's
        except FileNotFoundError:
            return self.write_create_only(rel, data)
        except Exception as e:  # noqa: BLE001
            raise self._error("read", rel, e) from None
        if not same or digest_bytes(current) != expected_digest:
            raise FileExistsError(errno.EEXIST, f"{self.display(rel)} changed since it was read")
        try:
            self.upload_if_generation(self._key(rel), data, generation)
        except Exception as e:  # noqa: BLE001
            if isinstance(e, FileExistsError) or precondition_failed(e):
                raise FileExistsError(errno.EEXIST, f"{self.display(rel)} changed since it was read") from None
            raise self._error("commit", rel, e) from None
        self._invalidate(path)

    def upload_if_generation(self, key: str, data: bytes, generation: Any) -> None:
        """One multipart upload of ``key`` on the condition ``ifGenerationMatch=generation``
        (the form gcsfs itself uses for create-only; fake-gcs-server ignores the condition on
        a plain media upload). HTTP 412 comes back as ``FileExistsError``."""
        import json
        from urllib.parse import quote

        fs = self.fs
        head = ("--==0==\nContent-Type: application/json; charset=UTF-8\n\n" + json.dumps({"name": key})
                + "\n--==0==\nContent-Type: application/octet-stream\n\n")
        body = head.encode() + data + b"\n--==0==--"
        self._run(fs._call("POST", f"{fs._location}/upload/storage/v1/b/{quote(self.bucket)}/o", uploadType="multipart",
                           headers={"Content-Type": 'multipart/related; boundary="==0=="'}, data=body, json_out=True,
                           ifGenerationMatch=str(generation)))
