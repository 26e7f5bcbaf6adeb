"""Offline validation of rendered manifests (the ``k8s`` extra).

Core objects (ConfigMap) go through ``kubernetes-validate``'s bundled,
strict Kubernetes schemas. RayCluster and RayJob go through the checked-in
KubeRay CRD schemas in ``k8s/schema/`` (``jsonschema``), and every pod
template inside them through ``kubernetes-validate`` as a core/v1
PodTemplate: the CRD embeds exactly that type.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from vlcluster.backends.k8s.profile import k8s_file

KUBERNETES_VERSION = "1.30"


def crd_schema(manifest: dict) -> dict:
    group, version = manifest["apiVersion"].split("/")
    return json.loads(k8s_file(f"schema/{manifest['kind'].lower()}.{group}-{version}.json").read_text())


def pod_templates(manifest: dict) -> Iterator[tuple[str, dict]]:
    """(where, PodTemplateSpec) of every pod a KubeRay object describes."""
    spec = manifest["spec"]
    cluster = spec.get("rayClusterSpec", spec) if manifest["kind"] == "RayJob" else spec
    if "headGroupSpec" in cluster:
        yield "headGroupSpec.template", cluster["headGroupSpec"]["template"]
    for index, group in enumerate(cluster.get("workerGroupSpecs", [])):
        yield f"workerGroupSpecs[{index}].template", group["template"]
    if "submitterPodTemplate" in spec:
        yield "submitterPodTemplate", spec["submitterPodTemplate"]


def as_pod_template(manifest: dict, template: dict) -> dict:
    meta = {"name": manifest["metadata"]["name"], "namespace": manifest["metadata"].get("namespace", "default")}
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": meta, "template": template}


def core_errors(manifest: dict, where: str) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(part) for part in exc.path)
        return [f"{where}: {path}: {exc.message} (Kubernetes {exc.version})"]
    return []


def crd_errors(manifest: dict, where: str) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft202012Validator(crd_schema(manifest))
    return [f"{where}: {'.'.join(str(p) for p in error.path)}: {error.message}" for error in validator.iter_errors(manifest)]


def validation_errors(manifests: list[dict]) -> list[str]:
    """Every way the manifests break the Kubernetes or KubeRay schemas; empty if valid."""
    from vlcluster.extras import require

    require("jsonschema", "render --validate")
    require("kubernetes_validate", "render --validate")
    errors = []
    for manifest in manifests:
        where = f"{manifest.get('kind')}/{manifest.get('metadata', {}).get('name')}"
        if not manifest.get("apiVersion", "").startswith("ray.io/"):
            errors += core_errors(manifest, where)
            continue
        errors += crd_errors(manifest, where)
        for path, template in pod_templates(manifest):
            errors += core_errors(as_pod_template(manifest, template), f"{where} {path}")
    return errors
