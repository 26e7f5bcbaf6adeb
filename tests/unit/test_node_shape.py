"""One rule turns a stage's resources into what a node asks for, on SLURM,
Kubernetes and Ray alike."""

from __future__ import annotations

import pytest

from vlcluster.backends.k8s.profile import KubeProfile
from vlcluster.backends.k8s.render import pod_shape
from vlcluster.backends.node_shape import SiteDefaults, node_shape
from vlcluster.backends.ray.backend import RayBackend
from vlcluster.backends.slurm.backend import sbatch_parameters
from vlcluster.graph import build_graph
from vlcluster.jobspec.load import validate
from vlcluster.jobspec.models import ClusterProfile, ResourcesSpec
from vlcluster.plan import make_plan

SITE = dict(cpus_per_gpu=2, mem_gb_per_gpu=10)


@pytest.mark.parametrize("resources, kind, expected", [
    ({"gpus_per_node": 2}, "pretrain", (2, 4, 20)),  # per-GPU defaults
    ({"gpus_per_node": 1, "procs_per_node": 4}, "pretrain", (1, 4, 10)),  # never fewer CPUs than ranks
    ({"procs_per_node": 3}, "pretrain", (0, 3, 16)),
    ({"procs_per_node": 3}, "eval", (0, 1, 16)),  # one process, whatever procs_per_node says
    ({"gpus_per_node": 1, "cpus_per_node": 7, "mem_gb": 3}, "merge", (1, 7, 3)),  # given values win
])
def test_every_backend_asks_for_the_same_node(resources, kind, expected, tmp_path):
    res = ResourcesSpec(**resources)
    shape = node_shape(res, kind, SiteDefaults(**SITE, cpus=1, mem_gb=16))
    assert (shape.gpus, shape.cpus, shape.mem_gb) == expected
    stage = {"kind": kind, "resources": resources}
    if kind == "pretrain":
        stage.update(data={"train": "x.tar"}, train={"steps": 1, "batch_size": 32})
    elif kind in {"eval", "merge"}:
        stage.update(source="m", **({"data": {"train": "x.tar"}} if kind == "eval" else {}))
    stages = {"s": stage, "m": {"kind": "pretrain", "data": {"train": "x.tar"}, "train": {"steps": 1}}}
    spec = validate({"name": "shape", "stages": stages}, "<test>").stages["s"]
    slurm = sbatch_parameters(spec, ClusterProfile(**SITE, cpus_per_node=1, mem_gb=16), "job")
    assert slurm["cpus_per_task"] == shape.cpus
    pod = pod_shape(spec.resources, kind, KubeProfile(image="i", ray_version="2", **SITE, cpus=1, mem_gb=16))
    assert (pod.gpus, pod.cpus, pod.mem_gb) == expected
    graph = build_graph(validate({"name": "shape", "stages": stages}, "<test>"))
    plan = next(plan for plan in make_plan(graph, tmp_path) if plan.name == "s")
    bare = node_shape(res, kind)  # Ray: no site defaults
    assert RayBackend.entrypoint_resources(graph, plan) == {"entrypoint_num_cpus": bare.cpus, "entrypoint_num_gpus": bare.gpus}
