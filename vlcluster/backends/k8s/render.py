"""Kubernetes (KubeRay) manifests of a pipeline: ``vlcluster render FILE --backend k8s``.

Three objects, rendered from the spec into the templates of ``k8s/``:

- a ConfigMap holding the job file, mounted on the Ray head;
- a RayCluster whose worker groups are the resource shapes of the stages: one
  pod is one node of a stage, with its GPUs, CPUs, memory and a memory-backed
  ``/dev/shm`` for data-loader workers; groups start at zero pods and the
  autoscaler grows them while a stage needs them;
- a RayJob whose entrypoint runs the whole pipeline on that cluster the way
  the Ray backend does (``vlcluster submit FILE --backend ray --address auto``).

Site settings (image, namespace, volume claim, per-GPU defaults) come from a
profile, ``k8s/profile.yaml`` (read by ``profile.py``). Credentials only ever
appear as the name of a Secret whose keys become environment variables.
"""

from __future__ import annotations

import copy
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

from vlcluster.backends.k8s.profile import KubeProfile, k8s_file
from vlcluster.backends.node_shape import SiteDefaults, node_shape
from vlcluster.graph import Graph
from vlcluster.errors import SpecError
from vlcluster.jobspec.load import read_yaml, validated_yaml
from vlcluster.jobspec.models import ResourcesSpec
from vlcluster.storage.paths import is_remote

JOB_MOUNT = "/etc/vlcluster"  # where the head sees the job file
RUNS_VOLUME, SHM_VOLUME, JOB_VOLUME = "runs", "dshm", "job"


@dataclass(frozen=True)
class PodShape:
    """What one pod (one node of a stage) asks for."""

    gpus: int
    cpus: int
    mem_gb: float
    shm_gb: float

    @property
    def group_name(self) -> str:
        prefix = f"gpu{self.gpus}-" if self.gpus else ""
        return f"{prefix}cpu{self.cpus}-mem{quantity(self.mem_gb)}-shm{quantity(self.shm_gb)}".lower()


# ---- inputs -----------------------------------------------------------------


def load_template(name: str) -> dict:
    return read_yaml(k8s_file(name))


# ---- values -----------------------------------------------------------------


def k8s_name(text: str) -> str:
    """A DNS-1123 label from a pipeline name (``seed_100k`` -> ``seed-100k``)."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    if not name:
        raise SpecError(f"{text!r} gives no Kubernetes name (letters, digits and '-' only)")
    return name[:40].rstrip("-")  # KubeRay appends group and pod suffixes to it


def quantity(gb: float) -> str:
    """GiB as a Kubernetes quantity: whole GiB, else MiB."""
    return f"{int(gb)}Gi" if gb == int(gb) else f"{round(gb * 1024)}Mi"


def pod_shape(resources: ResourcesSpec, kind: str, profile: KubeProfile) -> PodShape:
    site = SiteDefaults(profile.cpus_per_gpu, profile.mem_gb_per_gpu, profile.cpus, profile.mem_gb)
    node = node_shape(resources, kind, site)
    # A memory-backed emptyDir counts against the pod's memory limit.
    shm_gb = resources.shm_gb or max(0.25, round(node.mem_gb * profile.shm_fraction * 4) / 4)  # in 256 MiB steps
    return PodShape(node.gpus, node.cpus, node.mem_gb, shm_gb)


def worker_groups(graph: Graph, profile: KubeProfile, source: str) -> dict[PodShape, int]:
    """Every resource shape of the pipeline and the most nodes a stage of it needs."""
    groups: dict[PodShape, int] = {}
    for name in graph.order:
        spec = graph.pipeline.stages[name]
        shape = pod_shape(spec.resources, spec.kind, profile)
        if shape.shm_gb >= shape.mem_gb:
            raise SpecError(f"{source}: stages.{name}.resources.shm_gb is {shape.shm_gb}; it is part of the "
                            f"pod's memory ({shape.mem_gb} GB) and must leave room for the processes")
        groups[shape] = max(groups.get(shape, 0), spec.resources.nodes)
    return groups


def container_resources(cpus: int, mem_gb: float, gpus: int, profile: KubeProfile) -> dict:
    amounts = {"cpu": str(cpus), "memory": quantity(mem_gb)}
    if gpus:
        amounts[profile.gpu_resource] = str(gpus)  # extended resources: request must equal limit
    return {"requests": dict(amounts), "limits": dict(amounts)}


# ---- objects ----------------------------------------------------------------


def object_metadata(name: str, pipeline: str, profile: KubeProfile) -> dict:
    labels = {"app.kubernetes.io/name": "vlcluster", "app.kubernetes.io/instance": pipeline}
    return {"name": name, "namespace": profile.namespace, "labels": labels}


def dress_pod(template: dict, profile: KubeProfile, resources: dict, volumes: dict[str, tuple[dict, str]]) -> None:
    """Image, resources, credentials and volumes on the pod's first container;
    ``volumes`` maps a name to (volume source, mount path)."""
    spec = template.setdefault("spec", {})
    container = spec["containers"][0]
    container["image"] = profile.image
    container["resources"] = resources
    if profile.credentials_secret:
        container["envFrom"] = [{"secretRef": {"name": profile.credentials_secret, "optional": True}}]
    container["volumeMounts"] = [{"name": name, "mountPath": path} for name, (_, path) in volumes.items()]
    spec["volumes"] = [{"name": name, **source} for name, (source, _) in volumes.items()]


def runs_volume(profile: KubeProfile) -> dict[str, tuple[dict, str]]:
    if not profile.runs_claim:
        return {}
    return {RUNS_VOLUME: ({"persistentVolumeClaim": {"claimName": profile.runs_claim}}, profile.runs_mount)}


def worker_group(base: dict, shape: PodShape, nodes: int, profile: KubeProfile) -> dict:
    group = copy.deepcopy(base)
    group.update(groupName=shape.group_name, replicas=0, minReplicas=0, maxReplicas=nodes)
    shm = {SHM_VOLUME: ({"emptyDir": {"medium": "Memory", "sizeLimit": quantity(shape.shm_gb)}}, "/dev/shm")}
    template = group["template"]
    dress_pod(template, profile, container_resources(shape.cpus, shape.mem_gb, shape.gpus, profile),
              {**runs_volume(profile), **shm})
    if shape.gpus:
        pod = template["spec"]
        if profile.gpu_node_selector:
            pod["nodeSelector"] = dict(profile.gpu_node_selector)
        if profile.gpu_tolerations:
            pod["tolerations"] = copy.deepcopy(profile.gpu_tolerations)
    return group


def render_cluster(name: str, configmap: str, graph: Graph, profile: KubeProfile, source: str) -> dict:
    cluster = load_template("raycluster.yaml")
    cluster["metadata"] = object_metadata(name, graph.pipeline.name, profile)
    spec = cluster["spec"]
    spec["rayVersion"] = profile.ray_version
    head = spec["headGroupSpec"]["template"]
    job = {JOB_VOLUME: ({"configMap": {"name": configmap}}, JOB_MOUNT)}
    dress_pod(head, profile, container_resources(profile.head_cpus, profile.head_mem_gb, 0, profile),
              {**runs_volume(profile), **job})
    base = spec["workerGroupSpecs"][0]
    spec["workerGroupSpecs"] = [
        worker_group(base, shape, nodes, profile) for shape, nodes in worker_groups(graph, profile, source).items()
    ]
    return cluster


def entrypoint(job_file: str, run_dir: str, overrides: list[str]) -> str:
    command = ["vlcluster", "submit", f"{JOB_MOUNT}/{job_file}", "--backend", "ray", "--address", "auto",
               "--run-dir", run_dir]
    for override in overrides:
        command += ["--set", override]
    return shlex.join(command)


def render_job(name: str, cluster: str, command: str, pipeline: str, profile: KubeProfile) -> dict:
    job = load_template("rayjob.yaml")
    job["metadata"] = object_metadata(name, pipeline, profile)
    job["spec"].update(entrypoint=command, clusterSelector={"ray.io/cluster": cluster})
    return job


def render_configmap(name: str, job_file: str, text: str, pipeline: str, profile: KubeProfile) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": object_metadata(name, pipeline, profile),
            "data": {job_file: text}}


def render_manifests(graph: Graph, source: str, overrides: list[str], run_dir: str | None,
                     profile: KubeProfile) -> list[dict]:
    """ConfigMap, RayCluster and RayJob of a pipeline, in the order to apply them."""
    pipeline = graph.pipeline.name
    name = k8s_name(pipeline)
    job_file = Path(source).name
    # The validated spec, not the file's text: comments and x- keys never reach the cluster.
    configmap = render_configmap(f"{name}-job", job_file, validated_yaml(source), pipeline, profile)
    cluster = render_cluster(name, configmap["metadata"]["name"], graph, profile, source)
    spec_run_dir = graph.pipeline.run_dir or ""
    # A run dir on an object store is reachable from the pods as it is; a local one goes to the runs volume.
    default = spec_run_dir if is_remote(spec_run_dir) else f"{profile.runs_mount}/{pipeline}"
    command = entrypoint(job_file, run_dir or default, overrides)
    return [configmap, cluster, render_job(name, name, command, pipeline, profile)]


def manifest_file(manifest: dict) -> str:
    return f"{manifest['kind'].lower()}.yaml"


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the job file) as literal blocks, so they stay readable."""


_Dumper.add_representer(
    str, lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)
)


def dump(manifests: list[dict]) -> str:
    return yaml.dump_all(manifests, Dumper=_Dumper, sort_keys=False, width=1000, explicit_start=True)
