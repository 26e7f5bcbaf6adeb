"""What one node of a stage asks for: GPUs, CPUs and memory.

One rule for every backend (SLURM's sbatch line, a KubeRay pod, a Ray job's
or placement-group bundle's resources): what ``resources`` gives wins; else
the site's per-GPU defaults for a GPU stage, its per-node defaults for a CPU
stage; and never fewer CPUs than the ranks the node runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlcluster.jobspec.models import ResourcesSpec
from vlcluster.launch import is_distributed


@dataclass(frozen=True)
class SiteDefaults:
    """A site's defaults (a SLURM or Kubernetes profile); None: no default."""

    cpus_per_gpu: int | None = None
    mem_gb_per_gpu: float | None = None
    cpus: int | None = None  # a stage without GPUs
    mem_gb: float | None = None  # a stage without GPUs


@dataclass(frozen=True)
class NodeShape:
    gpus: int
    cpus: int
    mem_gb: float | None  # None: the site's own default


def node_shape(resources: ResourcesSpec, kind: str, site: SiteDefaults = SiteDefaults()) -> NodeShape:
    gpus = resources.gpus_per_node
    ranks = resources.ranks_per_node if is_distributed(kind) else 1
    if gpus:
        cpus = resources.cpus_per_node or max((site.cpus_per_gpu or 1) * gpus, ranks)
        mem_gb = resources.mem_gb or (site.mem_gb_per_gpu * gpus if site.mem_gb_per_gpu else None)
    else:
        cpus = resources.cpus_per_node or max(site.cpus or 1, ranks)
        mem_gb = resources.mem_gb or site.mem_gb
    return NodeShape(gpus, cpus, mem_gb)
