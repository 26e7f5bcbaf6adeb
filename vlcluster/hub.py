"""``hf://ORG/NAME[@REVISION]``: a Hugging Face Hub model as ``init.checkpoint``
or ``data.tokenizer``, through huggingface_hub's own cache.

``vlcluster submit`` resolves each reference once on the submitting host
(downloading it into the cache unless ``HF_HUB_OFFLINE=1``, which reads the
cache only) and pins it to the commit it resolved to: ``hf://ORG/NAME@<sha>``
is what ``pipeline.json`` records and the stage hash covers, and what the
stage's ranks read, from the cache, without asking the Hub (so 48 ranks do
not download at once, and a moved branch never changes a running study).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from vlcluster.errors import SpecError

SCHEME = "hf://"
COMMIT = re.compile(r"^[0-9a-f]{40}$")
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def is_hub(value: object) -> bool:
    return isinstance(value, str) and value.startswith(SCHEME)


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str | None  # None: the default branch

    @classmethod
    def parse(cls, value: str, field: str) -> HubRef:
        body = value[len(SCHEME):]
        repo_id, _, revision = body.partition("@")
        if not REPO_ID.match(repo_id) or (_ and not revision):
            raise SpecError(f"{field}: {value!r} is not a Hub reference (expected hf://ORG/NAME or hf://ORG/NAME@REVISION)")
        return cls(repo_id, revision or None)

    def __str__(self) -> str:
        return f"{SCHEME}{self.repo_id}" + (f"@{self.revision}" if self.revision else "")

    @property
    def pinned(self) -> bool:
        return self.revision is not None and bool(COMMIT.match(self.revision))


def resolve(value: str, field: str) -> tuple[HubRef, Path]:
    """The reference pinned to its commit, and the local snapshot directory (downloaded if needed)."""
    ref = HubRef.parse(value, field)
    from vlcluster.extras import require

    require("huggingface_hub", field)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        snapshot = Path(snapshot_download(ref.repo_id, revision=ref.revision))
    except LocalEntryNotFoundError:
        raise SpecError(
            f"{field}: {value}: not in the Hugging Face cache ({_cache()}) and the Hub cannot be asked "
            "(HF_HUB_OFFLINE=1 or no network); download it on a machine with access "
            f"(`hf download {ref.repo_id}`) into the same HF_HOME, or unset HF_HUB_OFFLINE"
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise SpecError(f"{field}: {value}: the Hub has no such model or revision ({type(exc).__name__}); "
                        "check the id, and HF_TOKEN in the environment for a private or gated model") from None
    return HubRef(ref.repo_id, snapshot.name), snapshot


def local_snapshot(value: str, field: str) -> Path:
    """The snapshot directory of a reference; a pinned one is read from the cache without asking the Hub."""
    ref = HubRef.parse(value, field)
    if ref.pinned:
        from huggingface_hub.file_download import repo_folder_name

        snapshot = Path(_cache()) / repo_folder_name(repo_id=ref.repo_id, repo_type="model") / "snapshots" / ref.revision
        if snapshot.is_dir():
            return snapshot
    return resolve(value, field)[1]


def _cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def pin_pipeline(pipeline) -> None:
    """Replace every ``hf://`` reference of the pipeline by its pinned form (in place)."""
    for name, stage in pipeline.stages.items():
        init = getattr(stage, "init", None)
        if init is not None and is_hub(init.checkpoint):
            init.checkpoint = str(resolve(init.checkpoint, f"stages.{name}.init.checkpoint")[0])
        data = getattr(stage, "data", None)
        if data is not None and is_hub(data.tokenizer):
            data.tokenizer = str(resolve(data.tokenizer, f"stages.{name}.data.tokenizer")[0])


def tokenizer_file(value: str, field: str) -> Path:
    """A Hub tokenizer's ``tokenizer.json`` (the fast-tokenizer file vlcluster reads)."""
    path = local_snapshot(value, field) / "tokenizer.json"
    if not path.is_file():
        raise SpecError(f"{field}: {value} has no tokenizer.json (vlcluster reads fast tokenizers' tokenizer.json)")
    return path
