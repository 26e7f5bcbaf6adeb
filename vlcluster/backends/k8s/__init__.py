"""KubeRay manifests of a pipeline (``render --backend k8s``): ``render.py``
builds them, ``validate.py`` checks them offline against the Kubernetes and
KubeRay schemas. On the cluster the pipeline runs through the Ray backend."""
