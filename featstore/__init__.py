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

from . import errors, fileio, params, remote
from ._build import BuildOptions, build, default_workers
from ._preprocess import PREPROCESSING, Preprocessing, make_transforms, resolve_transform
from .datasets import DatasetName, DatasetText, class_mapping, dataset_names, dataset_splits, load_split, parse_dataset_name, stratified_subset
from ._device import DEVICES, Device, resolve_device
from .models import POOLINGS, WEIGHT_MAPPINGS, WEIGHT_SOURCES, FeatureExtractor, create_backbone, list_layers
from ._spec import DTYPES, ExtractionSpec, TransformSpec
from ._store import DEFAULT_STORE, QUERY_KEYS, FeatureStore, Group, open
from ._extras import DISTRIBUTION, EXTRAS, require as require_extra

__all__ = [
    "__version__",
    "DISTRIBUTION",
    "EXTRAS",
    "require_extra",
    "open",
    "build",
    "BuildOptions",
    "default_workers",
    "FeatureStore",
    "Group",
    "ExtractionSpec",
    "TransformSpec",
    "DEFAULT_STORE",
    "QUERY_KEYS",
    "WEIGHT_SOURCES",
    "WEIGHT_MAPPINGS",
    "POOLINGS",
    "DTYPES",
    "DEVICES",
    "Device",
    "resolve_device",
    "create_backbone",
    "list_layers",
    "FeatureExtractor",
    "resolve_transform",
    "make_transforms",
    "PREPROCESSING",
    "Preprocessing",
    "dataset_names",
    "dataset_splits",
    "load_split",
    "stratified_subset",
    "parse_dataset_name",
    "DatasetName",
    "DatasetText",
    "class_mapping",
    "errors",
    "params",
    "fileio",
]
