"""Object storage (``s3://`` and any other fsspec URL) for shards and run directories.

- :mod:`.config`: the pipeline's ``storage:`` section (endpoint, region,
  profile or anonymous access, local cache directory), how it reaches every
  process (the ``VLCLUSTER_STORAGE`` environment variable and fsspec's
  per-protocol defaults), and the refusal of anything that looks like a secret.
- :mod:`.paths`: run-directory paths (``pathlib.Path`` locally,
  ``upath.UPath`` on object stores), single-PUT records, local copies of
  remote files, publishing files written locally.
- :mod:`.cache`: local copies of remote objects keyed by URL and ETag, safe
  for several ranks on one machine.
- :mod:`.shardlist`: shard lists from brace patterns, globs and prefixes.
- :mod:`.errors`: botocore/s3fs failures as one-paragraph errors; redaction.
- :mod:`.retries`: transient failures retried with backoff and counted;
  :mod:`.s3client` is s3fs's filesystem with that policy, used for ``s3://``.

Credentials are never part of a job file: they come from the environment
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``), a named profile or the
instance's role, exactly as botocore resolves them.
"""
