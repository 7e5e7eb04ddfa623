"""probes: similarity math and linear probes on cached features.

Works on numpy arrays, torch tensors, zarr arrays and featstore groups; never imports
backbones or timm.

>>> import probes
>>> probes.subset_cka(X, [idx_a, idx_b], estimator="biased")
"""

from ._cka import (
    CKAResult,
    CKAStatistics,
    ESTIMATORS as CKA_ESTIMATORS,
    cka_statistics,
    cross_cka,
    linear_cka,
    subset_cka,
)

__all__ = ["subset_cka", "cka_statistics", "cross_cka", "linear_cka", "CKAResult", "CKAStatistics", "CKA_ESTIMATORS"]

from ._engine import SOLVERS, SubsetProbes, load_training_data
from ._selection import PAPER_FRACTIONS, SELECTION_MODES, Draw, make_families, random_permutation, random_projection, subset_size

__all__ += ["SubsetProbes", "SOLVERS", "load_training_data", "PAPER_FRACTIONS", "SELECTION_MODES", "Draw",
            "make_families", "random_permutation", "random_projection", "subset_size"]
