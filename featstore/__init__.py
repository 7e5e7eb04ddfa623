"""featstore: cache pre-trained vision features once, probe them many times.

Notebook use::

    import featstore
    s = featstore.open("data/featstore.zarr")
    s.groups()                                   # what is cached
    g = s.group(model="tf_efficientnet_lite0", dataset="fashion-mnist", split="train")
    X = g.numpy()            # (n_samples, n_neurons) numpy array
    y = g.labels             # (n_samples,) int64
    Xd = g.dask()            # lazy dask array, chunked like the store
    g.spec                   # the ExtractionSpec that produced it
"""

__version__ = "0.1.0"

from . import errors
from ._build import build
from ._datasets import dataset_names, dataset_splits, load_split
from ._models import WEIGHT_SOURCES, POOLINGS, create_backbone, list_layers
from ._spec import ExtractionSpec, TransformSpec
from ._store import DEFAULT_STORE, FeatureStore, Group, open

__all__ = [
    "__version__",
    "open",
    "build",
    "FeatureStore",
    "Group",
    "ExtractionSpec",
    "TransformSpec",
    "DEFAULT_STORE",
    "WEIGHT_SOURCES",
    "POOLINGS",
    "create_backbone",
    "list_layers",
    "dataset_names",
    "dataset_splits",
    "load_split",
    "errors",
]
