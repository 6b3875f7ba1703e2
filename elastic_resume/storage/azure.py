"""``az://container/prefix`` (``abfs://``) through adlfs and the Azure blob client."""

from __future__ import annotations

import errno
from typing import Any

from .objectstore import FsspecStorage, open_fs
from .protocol import digest_bytes


class AzureStorage(FsspecStorage):
    """``az://container/prefix`` (also ``abfs://``) through adlfs, storage options as adlfs takes
    them (``connection_string``, ``account_name`` + ``account_key``, ...). Create-only:
    ``If-None-Match: *``; compare-and-swap: ``If-Match`` on the ETag of the bytes compared."""

    scheme = "az"

    def __init__(self, url: str, options: dict[str, Any]) -> None:
        from adlfs import AzureBlobFileSystem

        fs = open_fs(AzureBlobFileSystem, options, what="Azure", bad=(TypeError, ValueError))
        super().__init__("az://" + url.split("://", 1)[1], options, fs)

    def endpoint(self) -> str | None:
        try:
            url = self.fs.service_client.url  # the account's blob endpoint, however the options gave it
        except Exception:  # noqa: BLE001 - no client yet: the first request reports the problem
            return None
        return url if isinstance(url, str) else None

    def replace_if(self, rel: str, data: bytes, expected_digest: str) -> None:
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError

        fs, container, key = self.fs, self.bucket, self._key(rel)

        async def swap() -> None:
            async with fs.service_client.get_blob_client(container, key) as blob:
                props = await blob.get_blob_properties()
                stream = await blob.download_blob(etag=props.etag, match_condition=MatchConditions.IfNotModified)
                if digest_bytes(await stream.readall()) != expected_digest:
                    raise FileExistsError(errno.EEXIST, f"{self.display(rel)} changed since it was read")
                await blob.upload_blob(data, overwrite=True, etag=props.etag, match_condition=MatchConditions.IfNotModified)

        try:
            self._run(swap())
        except ResourceNotFoundError:
            return self.write_create_only(rel, data)
        except (FileExistsError, ResourceModifiedError):
            raise FileExistsError(errno.EEXIST, f"{self.display(rel)} changed since it was read") from None
        except Exception as e:  # noqa: BLE001
            raise self._error("commit", rel, e) from None
        self._invalidate(self._p(rel))
