"""One import of a real dataset into task shards + dataset.json (the ``import`` stage and ``vlcluster import`` run it)."""

from __future__ import annotations

import time

from vlcluster.importers.common import ImportOptions
from vlcluster.importers.registry import FORMATS


def run_import(fmt: str, inputs: dict, options: ImportOptions) -> dict:
    """Run format ``fmt``'s importer on ``inputs`` (name -> path, or paths for an
    input that takes many): its record plus the seconds it took."""
    spec = FORMATS[fmt]
    arguments = {i.name: ([inputs[i.name]] if isinstance(inputs[i.name], str) else list(inputs[i.name])) if i.many else inputs[i.name]
                 for i in spec.inputs if i.name in inputs}
    started = time.perf_counter()
    record = spec.run(options, **arguments)
    return {**record, "seconds": time.perf_counter() - started}
