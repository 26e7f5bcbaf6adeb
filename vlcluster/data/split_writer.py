"""Write one split of a dataset as numbered WebDataset shards (synthetic tasks, importers)."""

from __future__ import annotations

import fsspec
import webdataset as wds


class SplitWriter:
    """``{root}/{split}-{index:06d}.tar`` with at most ``shard_size`` samples each."""

    def __init__(self, root: str, split: str, shard_size: int):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.root, self.split, self.shard_size = str(root).rstrip("/"), split, shard_size
        self.names: list[str] = []
        self.count = 0
        self._file = self._tar = None

    def write(self, sample: dict) -> None:
        if self.count % self.shard_size == 0:
            self._close_shard()
            name = f"{self.split}-{len(self.names):06d}.tar"
            self.names.append(name)
            self._file = fsspec.open(f"{self.root}/{name}", "wb").open()
            # Fixed mtime (and TarWriter's fixed user/group/mode): byte-identical shards per input.
            self._tar = wds.TarWriter(self._file, encoder=False, mtime=0, compress=False)
        self._tar.write(sample)
        self.count += 1

    def _close_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._file.close()
            self._tar = self._file = None

    def close(self) -> dict:
        self._close_shard()
        return {"shards": self.names, "count": self.count}
