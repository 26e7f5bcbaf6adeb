"""What ``vlcluster render FILE --backend k8s`` writes, without a cluster:
golden manifests for the quickstart and the 6 x 8 GPU seed job, offline
validation against the Kubernetes schemas (kubernetes-validate) and the
checked-in KubeRay CRD schemas (k8s/schema/), resources from each stage's
``resources``, and no secret values anywhere.

Regenerate the golden files after an intended change with
``VLCLUSTER_REGEN_GOLDEN=1 python -m pytest tests/unit/test_k8s_render.py``.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import yaml

from tests.support import REPO
from tests.support.golden import check_golden
from vlcluster.backends.k8s.render import k8s_name
from vlcluster.backends.k8s.validate import validation_errors


def render(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vlcluster.cli", "render", *args, "--backend", "k8s"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )


def manifests(*args: str) -> tuple[str, dict[str, dict]]:
    """The rendered text and its objects by kind."""
    result = render(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout, {doc["kind"]: doc for doc in yaml.safe_load_all(result.stdout)}


def worker_pods(cluster: dict) -> list[dict]:
    return [group["template"]["spec"] for group in cluster["spec"]["workerGroupSpecs"]]


def all_containers(objects: dict[str, dict]) -> list[dict]:
    cluster = objects["RayCluster"]["spec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"], *worker_pods(objects["RayCluster"])]
    return [container for pod in pods for container in pod["containers"]]


@pytest.mark.parametrize("job", ["quickstart", "seed_100k"])
def test_golden_manifests_validate_offline(job):
    text, objects = manifests(f"jobs/{job}.yaml")
    check_golden(f"{job}.k8s.yaml", text)
    assert list(objects) == ["ConfigMap", "RayCluster", "RayJob"]
    assert validation_errors(list(objects.values())) == []


def test_seed_100k_asks_for_six_nodes_of_eight_gpus_with_shared_memory():
    _, objects = manifests("jobs/seed_100k.yaml")
    (group,) = objects["RayCluster"]["spec"]["workerGroupSpecs"]
    assert (group["groupName"], group["minReplicas"], group["maxReplicas"]) == ("gpu8-cpu80-mem480gi-shm120gi", 0, 6)
    pod = group["template"]["spec"]
    amounts = {"cpu": "80", "memory": "480Gi", "nvidia.com/gpu": "8"}
    assert pod["containers"][0]["resources"] == {"requests": amounts, "limits": amounts}
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "120Gi"}} in pod["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert objects["RayCluster"]["metadata"]["name"] == "seed-100k"  # DNS-1123: no underscore


def test_rayjob_runs_the_shipped_job_file_with_the_ray_backend(tmp_path):
    _, objects = manifests("jobs/quickstart.yaml", "--set", "stages.merge.alpha=0.5")
    job, cluster, configmap = objects["RayJob"], objects["RayCluster"], objects["ConfigMap"]
    assert job["spec"]["entrypoint"] == (
        "vlcluster submit /etc/vlcluster/quickstart.yaml --backend ray --address auto "
        "--run-dir /runs/quickstart --set stages.merge.alpha=0.5"
    )
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    # The validated spec is published, not the file: no comments, no x- anchors, the same pipeline.
    published = configmap["data"]["quickstart.yaml"]
    assert "#" not in published and "x-" not in published and "&" not in published
    (tmp_path / "quickstart.yaml").write_text(published)
    from vlcluster.jobspec.load import load_pipeline

    assert load_pipeline(tmp_path / "quickstart.yaml") == load_pipeline(REPO / "jobs" / "quickstart.yaml")
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    assert {"name": "job", "configMap": {"name": configmap["metadata"]["name"]}} in head["volumes"]


def test_resources_come_from_each_stage(tmp_path):
    _, objects = manifests(
        "jobs/quickstart.yaml", "--set", "stages.seed.resources.gpus_per_node=2",
        "--set", "stages.seed.resources.shm_gb=8", "--set", "stages.seed.resources.nodes=3",
    )
    groups = {group["groupName"]: group for group in objects["RayCluster"]["spec"]["workerGroupSpecs"]}
    # seed: 2 GPUs x (10 CPUs, 60 GB) from the profile, 3 nodes; every other stage: the CPU defaults
    assert set(groups) == {"cpu4-mem16gi-shm4gi", "gpu2-cpu20-mem120gi-shm8gi"}
    gpu = groups["gpu2-cpu20-mem120gi-shm8gi"]
    assert gpu["maxReplicas"] == 3
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"] == {"cpu": "20", "memory": "120Gi", "nvidia.com/gpu": "2"}
    assert "nvidia.com/gpu" not in groups["cpu4-mem16gi-shm4gi"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert validation_errors(list(objects.values())) == []


def test_shared_memory_must_fit_in_the_pods_memory():
    result = render("jobs/seed_100k.yaml", "--set", "stages.seed.resources.shm_gb=480")
    assert result.returncode == 2
    assert "stages.seed.resources.shm_gb is 480.0" in result.stderr and "Traceback" not in result.stderr


def test_no_secret_values_only_a_secret_name():
    text, objects = manifests("jobs/seed_100k.yaml")
    assert "kind: Secret" not in text
    for container in all_containers(objects):
        assert container["envFrom"] == [{"secretRef": {"name": "vlcluster-credentials", "optional": True}}]
        assert all("value" not in var for var in container.get("env", []))


def test_out_dir_gets_one_file_per_object(tmp_path):
    text, objects = manifests("jobs/quickstart.yaml")
    result = render("jobs/quickstart.yaml", "-o", str(tmp_path), "--validate")
    assert result.returncode == 0, result.stderr
    written = {path.name: yaml.safe_load(path.read_text()) for path in tmp_path.iterdir()}
    assert written == {"configmap.yaml": objects["ConfigMap"], "raycluster.yaml": objects["RayCluster"],
                       "rayjob.yaml": objects["RayJob"]}


def test_validation_catches_what_the_api_server_would_refuse():
    _, objects = manifests("jobs/seed_100k.yaml")
    broken = copy.deepcopy(list(objects.values()))
    broken[1]["spec"]["workerGroupSpecs"][0]["maxReplica"] = 6  # KubeRay field misspelt
    broken[1]["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = [80]
    broken[2]["spec"]["submissionMode"] = "K8sMode"
    errors = "\n".join(validation_errors(broken))
    assert "'maxReplica' was unexpected" in errors
    assert "workerGroupSpecs[0].template: template.spec.containers.0.resources.limits.cpu" in errors  # core/v1 schema
    assert "'K8sMode' is not one of" in errors


@pytest.mark.parametrize(("pipeline", "name"), [("seed_100k", "seed-100k"), ("Paper.Recipe", "paper-recipe"), ("x" * 70, "x" * 40)])
def test_pipeline_names_become_dns_labels(pipeline, name):
    assert k8s_name(pipeline) == name
