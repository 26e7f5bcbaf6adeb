"""s3fs's filesystem with vlcluster's retry policy and counters
(:mod:`vlcluster.storage.retries`); fsspec uses it for ``s3://``."""

from __future__ import annotations

from s3fs import S3FileSystem

from vlcluster.storage.retries import S3FS_TRIES, count_events


class CountingS3FileSystem(S3FileSystem):
    retries = S3FS_TRIES

    async def set_session(self, refresh: bool = False, kwargs: dict = {}):  # noqa: B006 - s3fs's signature
        client = await super().set_session(refresh=refresh, kwargs=kwargs)
        if not getattr(client, "_vlcluster_counted", False):
            count_events(client.meta.events)
            client._vlcluster_counted = True
        return client
