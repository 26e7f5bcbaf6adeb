"""Optional extras: a clear error, not a traceback, when one is missing.

The README's first install has no extras; ``--backend slurm`` needs
submitit, ``--backend ray`` Ray, object-store run directories s3fs and
universal_pathlib, ``render --validate`` the schema validators. Each is
imported only where it is used, through :func:`require`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from vlcluster.errors import SpecError

# module -> the extra of pyproject.toml that installs it
EXTRA_OF = {
    "submitit": "slurm",
    "ray": "ray",
    "s3fs": "s3",
    "upath": "s3",
    "jsonschema": "k8s",
    "kubernetes_validate": "k8s",
    "mlflow": "tracking",
    "wandb": "tracking",
    "huggingface_hub": "hub",
}


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (a dotted name whose top package is in :data:`EXTRA_OF`)
    or raise one SpecError paragraph naming the install command."""
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != top:
            raise  # the package is there but one of its own imports is broken: show that
        extra = EXTRA_OF[top]
        raise SpecError(
            f"{purpose} needs the optional package {top!r}, which is not installed in this Python "
            f"environment. Install vlcluster's {extra!r} extra: pip install -e '.[{extra}]' "
            f"(from the vlcluster checkout), then run the command again."
        ) from None
