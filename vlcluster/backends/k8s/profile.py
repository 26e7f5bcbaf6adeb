"""A site's Kubernetes profile (``k8s/profile.yaml``) and the files of
``k8s/`` (templates, CRD schemas), looked up next to the job, else in the
checkout."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from vlcluster.errors import SpecError
from vlcluster.jobspec.load import read_yaml
from vlcluster.jobspec.models import Strict

K8S_DIRS = (Path("k8s"), Path(__file__).resolve().parents[3] / "k8s")


class KubeProfile(Strict):
    """Where the manifests go and the defaults a stage's ``resources`` is
    completed with (``k8s/profile.yaml``)."""

    namespace: str = "default"
    image: str = Field(description="image with Ray, torch and vlcluster installed")
    ray_version: str = Field(description="the Ray version inside the image")
    gpu_resource: str = Field("nvidia.com/gpu", description="extended resource name of a GPU")
    cpus_per_gpu: int = Field(8, ge=1)
    mem_gb_per_gpu: float = Field(60, gt=0)
    cpus: int = Field(4, ge=1, description="CPUs of a stage without GPUs")
    mem_gb: float = Field(16, gt=0, description="memory of a stage without GPUs")
    shm_fraction: float = Field(0.25, gt=0, lt=1, description="/dev/shm share of a pod's memory by default")
    head_cpus: int = Field(2, ge=1)
    head_mem_gb: float = Field(8, gt=0)
    runs_claim: str | None = Field(None, description="PersistentVolumeClaim (ReadWriteMany) holding the run directories")
    runs_mount: str = "/runs"
    credentials_secret: str | None = Field(None, description="Secret whose keys become env vars; only its name is rendered")
    gpu_node_selector: dict[str, str] = Field(default_factory=dict)
    gpu_tolerations: list[dict] = Field(default_factory=list)


def k8s_file(name: str) -> Path:
    """``k8s/<name>`` next to the job (the working directory), else in the checkout."""
    candidates = [folder / name for folder in K8S_DIRS]
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        raise SpecError(f"{name} not found (looked in {', '.join(str(c) for c in candidates)})")
    return found


def load_profile(path: str | None = None) -> KubeProfile:
    from pydantic import ValidationError

    source = Path(path) if path else k8s_file("profile.yaml")
    try:
        return KubeProfile.model_validate(read_yaml(source))
    except ValidationError as exc:
        from vlcluster.jobspec.load import describe_validation_error

        raise SpecError(describe_validation_error(str(source), exc)) from None
