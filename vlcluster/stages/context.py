"""What a running stage knows: its spec, its directory, and its upstream.

A stage process is started as ``python -m vlcluster.run RUN_DIR STAGE`` on
any backend; it rebuilds this context from ``RUN_DIR/pipeline.json``, which
the submitting CLI wrote.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlcluster.data.inputs import DataSources
from vlcluster.graph import Graph, build_graph
from vlcluster.stages.rundir import StageDir, pipeline_file, read_json, stage_dir, write_json_atomic
from vlcluster.jobspec.models import DataSpec
from vlcluster.jobspec.pipeline import Pipeline
from vlcluster.storage.paths import local_copy, run_path


def _local(path) -> str | None:
    """Tokenizer and answer files are read by libraries that need a local file
    (``hf://`` tokenizers: the ``tokenizer.json`` of the pinned snapshot in the Hub cache)."""
    from vlcluster.hub import is_hub, tokenizer_file

    if is_hub(path):
        return str(tokenizer_file(path, "data.tokenizer"))
    return None if path is None else str(local_copy(path))


def split_shards(out_dir: Path, split: str, count: int, shard_size: int) -> list[str]:
    """Shard paths a data stage writes (see vlcluster.data.synthetic)."""
    shards = math.ceil(count / shard_size)
    return [str(out_dir / f"{split}-{index:06d}.tar") for index in range(shards)]


@dataclass(frozen=True)
class StageContext:
    run_dir: Path
    name: str
    graph: Graph

    @property
    def pipeline(self) -> Pipeline:
        return self.graph.pipeline

    @property
    def spec(self):
        return self.pipeline.stages[self.name]

    @property
    def spec_hash(self) -> str:
        return self.graph.hashes[self.name]

    @property
    def dir(self) -> StageDir:
        return stage_dir(self.run_dir, self.name)

    def upstream_dir(self, name: str) -> StageDir:
        return stage_dir(self.run_dir, name)

    def data_sources(self, data: DataSpec) -> DataSources:
        from vlcluster.storage.shardlist import expand as expand_urls

        if data.from_ is None:
            from vlcluster.data.sources import augmentation, field_map, train_mixture

            mixture = train_mixture((source.shards, source.weight) for source in data.train_sources())
            return DataSources(
                train=[url for source in mixture for url in source.urls],
                val=expand_urls(data.val) if data.val else [],
                tokenizer=_local(data.tokenizer),
                answers=_local(data.answers),
                shuffle_buffer=data.shuffle_buffer,
                shuffle_run=data.shuffle_run,
                train_mixture=mixture,
                fields=field_map(data.fields.image, data.fields.caption),
                augment=augmentation(data.augment, data.augment_flip),
            )
        producer = self.pipeline.stages[data.from_]  # a data stage
        out = self.upstream_dir(data.from_).root
        from vlcluster.data.sources import augmentation, field_map, single_source

        train = split_shards(out, "train", producer.n_train, producer.shard_size)
        return DataSources(
            train=train,
            train_mixture=single_source(train),
            fields=field_map(data.fields.image, data.fields.caption),
            augment=augmentation(data.augment, data.augment_flip),
            val=split_shards(out, "val", producer.n_val, producer.shard_size),
            tokenizer=_local(out / "tokenizer.json"),
            answers=_local(out / "answers.json"),
            shuffle_buffer=data.shuffle_buffer,
            shuffle_run=data.shuffle_run,
        )


def save_pipeline(run_dir: Path, graph: Graph) -> None:
    payload = {
        "pipeline": graph.pipeline.model_dump(mode="json", by_alias=True),
        "order": list(graph.order),
        "hashes": graph.hashes,
    }
    write_json_atomic(pipeline_file(run_dir), payload)


def pipeline_of_record(payload: Any, path: Path) -> Pipeline:
    """The pipeline saved in ``pipeline.json``, checked like a job file (a run
    directory may have been edited or damaged since)."""
    from vlcluster.errors import SpecError
    from vlcluster.jobspec.load import validate

    raw = payload.get("pipeline") if isinstance(payload, dict) else None
    if not isinstance(raw, dict) or not isinstance(raw.get("stages"), dict):
        raise SpecError(f"{path}: not a pipeline record (expected an object with 'pipeline.stages')")
    from vlcluster.jobspec.names import expanded_name_problem

    bad = [f"stages.{str(name)[:80]}: {problem}" for name in raw["stages"] if (problem := expanded_name_problem(name))]
    if bad:
        raise SpecError(f"{path}: invalid stage names:\n  " + "\n  ".join(bad[:10]))
    order = payload.get("order")
    # JSON records are written with sorted keys: restore the file's stage order.
    if isinstance(order, list) and sorted(map(str, order)) == sorted(raw["stages"]):
        raw["stages"] = {name: raw["stages"][name] for name in order}
    return validate(raw, str(path))


def load_graph(run_dir: Path) -> Graph:
    payload = read_json(pipeline_file(run_dir))
    if payload is None:
        raise FileNotFoundError(f"{run_dir}: not a vlcluster run directory (no pipeline.json)")
    pipeline = pipeline_of_record(payload, pipeline_file(run_dir))
    if pipeline.storage is not None:  # e.g. s3 shards read by a stage of a local run directory
        from vlcluster.storage.config import activate

        activate(pipeline.storage)
    return build_graph(pipeline, str(pipeline_file(run_dir)))


def load_context(run_dir: str | Path, name: str) -> StageContext:
    graph = load_graph(run_path(run_dir))
    if name not in graph.pipeline.stages:
        raise KeyError(f"stage {name!r} is not in {run_dir}/pipeline.json")
    return StageContext(run_dir=run_path(run_dir), name=name, graph=graph)
