"""probes: similarity math and linear probes on cached features.

Works on numpy arrays, torch tensors, zarr arrays and featstore groups; never imports
backbones or timm.

>>> import probes
>>> probes.subset_cka(X, [idx_a, idx_b], estimator="biased")
"""

from ._cka import (
    CKAEstimator,
    CKAOptions,
    CKAResult,
    CKAStatistics,
    ESTIMATORS as CKA_ESTIMATORS,
    cka_statistics,
    cross_cka,
    iter_row_blocks,
    linear_cka,
    subset_cka,
)
from ._batch import cpu_has_bf16
from ._data import TrainingData, load_training_data
from ._engine import Protocol, SubsetProbes, SubsetProbesParameters
from ._metrics import METRICS, Metric
from ._solvers import SOLVERS, Solver
from ._together import SHARED_PARAMETERS, fit_bytes, fit_together
from ._inputs import Features, RowFile, as_features
from ._presets import ORIGINAL_SCHEDULES, PRESETS, Preset, ReleasedSchedule, preset
from ._selection import (
    PAPER_FRACTIONS,
    SELECTION_MODES,
    Draw,
    Selection,
    SelectionMode,
    fractions_or_sizes,
    make_families,
    random_permutation,
    random_projection,
    subset_size,
)

__all__ = ["subset_cka", "cka_statistics", "cross_cka", "linear_cka", "iter_row_blocks", "CKAResult", "CKAStatistics",
           "CKAEstimator", "CKAOptions", "CKA_ESTIMATORS", "SubsetProbes", "SubsetProbesParameters", "fit_together", "fit_bytes", "SHARED_PARAMETERS", "Protocol",
           "Selection", "PRESETS", "Preset", "preset", "ORIGINAL_SCHEDULES", "ReleasedSchedule", "SOLVERS", "Solver", "METRICS", "Metric", "TrainingData", "load_training_data", "cpu_has_bf16", "Features", "RowFile", "as_features",
           "PAPER_FRACTIONS", "SELECTION_MODES", "SelectionMode", "fractions_or_sizes", "Draw", "make_families", "random_permutation",
           "random_projection", "subset_size"]
