"""Which neurons (or directions) each probe sees: the selection-mode registry.

A *draw* is one (mode, fraction, seed) choice of k = max(1, int(fraction * d)) inputs.
Draws of one mode and seed form a *family*: one ordering of the layer (a column
permutation or a projection basis) cut at several prefix lengths, so one seed's
subsets are nested across fractions, as in the original code
(``torch.manual_seed(seed); torch.randperm(d)[:k]``). The probe engine exploits the
nesting: each minibatch is multiplied once per column block between cuts, for every probe
that uses the block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from featstore.errors import InvalidParameterError, UnknownNameError

__all__ = ["Draw", "Family", "SELECTION_MODES", "PAPER_FRACTIONS", "make_families", "subset_size"]

# The paper's 22 fractions.
PAPER_FRACTIONS = (0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1,
                   0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.8, 0.9, 1.0)


def subset_size(fraction: float, d: int) -> int:
    """k = max(1, int(fraction * d)) (the original floors and can reach 0: guarded)."""
    if not isinstance(fraction, (int, float, np.floating, np.integer)) or isinstance(fraction, bool) \
            or not 0.0 < float(fraction) <= 1.0:
        raise InvalidParameterError(f"fraction={fraction!r} must be in (0, 1]")
    return max(1, int(float(fraction) * d))


@dataclass(frozen=True)
class Draw:
    """One probe's input selection, with everything needed to audit or retrain it.

    Attributes
    ----------
    mode : str
    fraction : float or None
        None for explicit index lists.
    k : int
        Number of inputs the probe sees.
    seed : int or None
    neurons : array of int or None
        The neuron indices (index modes).
    projection : str or None
        How the projection is regenerated (``pca``: fitted on the train split;
        ``randproj``: distribution and seed), for projection modes.
    """

    mode: str
    fraction: float | None
    k: int
    seed: int | None
    neurons: np.ndarray | None = field(default=None, compare=False, repr=False)
    projection: str | None = None

    def record(self) -> dict:
        return {"mode": self.mode, "fraction": self.fraction, "k": self.k, "seed": self.seed,
                "neurons": None if self.neurons is None else self.neurons.tolist(), "projection": self.projection}


@dataclass
class Family:
    """Draws sharing one ordering of the layer, cut at increasing prefix lengths.

    ``columns`` (d_sel,) selects and orders neurons, or ``basis`` (d, d_sel) projects.
    """

    mode: str
    seed: int | None
    lengths: tuple[int, ...]
    draws: list[Draw]
    columns: np.ndarray | None = None
    basis: np.ndarray | None = None

    @property
    def width(self) -> int:
        return self.lengths[-1]

    def transform(self, X):
        """Inputs of the family's widest probe: X[:, columns] or X @ basis (numpy or torch)."""
        if self.columns is not None:
            return X[:, self.columns[: self.width]]
        return X @ self.basis[:, : self.width]


# ----------------------------------------------------------------------------- orderings


def random_permutation(d: int, seed: int) -> np.ndarray:
    """``torch.manual_seed(seed); torch.randperm(d)``: identical across processes and machines."""
    import torch

    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(d, generator=g).numpy()


def _random_ordering(X_train, d, seed, options):
    return random_permutation(d, seed), None


def _prefix_ordering(X_train, d, seed, options):
    return np.arange(d), None


def _pca_basis(X_train, d, least: bool):
    """Principal directions of the train split (centred), sorted by variance."""
    if X_train is None:
        raise InvalidParameterError("mode 'pca' needs the train features to fit principal directions")
    X = np.asarray(X_train, dtype=np.float64)
    Xc = X - X.mean(axis=0)
    cov = Xc.T @ Xc / max(1, len(X) - 1)
    vals, vecs = np.linalg.eigh(cov)  # ascending
    order = np.argsort(vals)[::-1] if not least else np.argsort(vals)
    vecs = vecs[:, order]
    # an eigenvector's sign is arbitrary and differs between LAPACK builds; fix it (largest
    # entry positive, as scikit-learn's svd_flip) so a task gives the same rows on any machine
    signs = np.sign(vecs[np.argmax(np.abs(vecs), axis=0), np.arange(vecs.shape[1])])
    vecs *= np.where(signs == 0, 1.0, signs)
    # the original projects the uncentred features onto the directions; so do we
    return vecs.astype(np.float32)


def _pca_ordering(X_train, d, seed, options):
    return None, _pca_basis(X_train, d, least=False)


def _pca_least_ordering(X_train, d, seed, options):
    return None, _pca_basis(X_train, d, least=True)


def random_projection(d: int, k: int, seed: int, distribution: str = "uniform") -> np.ndarray:
    """k seeded random directions (d x k), each column scaled to unit norm.

    ``uniform`` is the original's variant (entries uniform in [0, 1)); ``gaussian`` draws
    N(0, 1) entries. Columns are generated in order, so the first k columns of a wider
    draw equal a k-column draw with the same seed.
    """
    import torch

    g = torch.Generator().manual_seed(int(seed))
    if distribution == "uniform":
        P = torch.rand((k, d), generator=g, dtype=torch.float64).T
    elif distribution == "gaussian":
        P = torch.randn((k, d), generator=g, dtype=torch.float64).T
    else:
        raise UnknownNameError("randproj distribution", distribution, ("uniform", "gaussian"))
    P = P / P.norm(dim=0, keepdim=True)
    return P.numpy().astype(np.float32)


def _randproj_ordering(X_train, d, seed, options):
    return None, random_projection(d, options["width"], seed, options.get("distribution", "uniform"))


# name -> (ordering function, needs a seed, is a projection)
SELECTION_MODES: dict[str, tuple[Callable, bool, bool]] = {
    "random": (_random_ordering, True, False),
    "prefix": (_prefix_ordering, False, False),
    "pca": (_pca_ordering, False, True),
    "pca-least": (_pca_least_ordering, False, True),
    "randproj": (_randproj_ordering, True, True),
}


def make_families(
    d: int,
    mode: str = "random",
    fractions: Sequence[float] = PAPER_FRACTIONS,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    X_train=None,
    subsets: Sequence[Sequence[int]] | None = None,
    randproj_distribution: str = "uniform",
) -> list[Family]:
    """Expand (mode, fractions, seeds) or explicit index lists into families of draws.

    Parameters
    ----------
    d : int
        Neurons in the layer.
    mode : str
        One of ``SELECTION_MODES`` (ignored when ``subsets`` is given).
    fractions : sequence of float in (0, 1]
    seeds : sequence of non-negative int
    X_train : array, optional
        Train features, needed by ``pca`` / ``pca-least``.
    subsets : sequence of index arrays, optional
        Explicit neuron lists (mode ``explicit``), one family each.
    """
    if subsets is not None:
        fams = []
        for i, s in enumerate(subsets):
            idx = np.asarray(s)
            if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
                raise InvalidParameterError(f"subsets[{i}] must be a non-empty 1-D array of neuron indices")
            if idx.min() < 0 or idx.max() >= d:
                raise InvalidParameterError(f"subsets[{i}] holds indices outside 0..{d - 1}")
            if len(np.unique(idx)) != len(idx):
                raise InvalidParameterError(f"subsets[{i}] repeats a neuron index")
            draw = Draw("explicit", None, len(idx), None, neurons=idx.copy())
            fams.append(Family("explicit", None, (len(idx),), [draw], columns=idx.copy()))
        return fams
    if mode not in SELECTION_MODES:
        raise UnknownNameError("selection mode", mode, list(SELECTION_MODES) + ["explicit (pass subsets=)"])
    fractions = list(fractions)
    if not fractions:
        raise InvalidParameterError("fractions is empty")
    ks = sorted({subset_size(f, d) for f in fractions})
    order_f = sorted(fractions, key=float)
    ordering, needs_seed, is_projection = SELECTION_MODES[mode]
    seeds = list(seeds) if needs_seed else [None]
    for s in seeds:
        if s is not None and (not isinstance(s, (int, np.integer)) or isinstance(s, bool) or s < 0):
            raise InvalidParameterError(f"seed={s!r} must be a non-negative integer")
    if len(set(seeds)) != len(seeds):
        raise InvalidParameterError(f"seeds={seeds!r} repeats a seed")
    fams = []
    for seed in seeds:
        columns, basis = ordering(X_train, d, seed, {"width": ks[-1], "distribution": randproj_distribution})
        draws = []
        for f in order_f:  # two fractions that floor to one k give two identical draws
            k = subset_size(f, d)
            if columns is not None:
                draws.append(Draw(mode, float(f), k, seed, neurons=np.asarray(columns[:k])))
            else:
                how = (f"train-split principal directions, {'largest' if mode == 'pca' else 'smallest'} variance first"
                       if mode.startswith("pca") else f"{randproj_distribution} random directions, seed {seed}")
                draws.append(Draw(mode, float(f), k, seed, projection=how))
        fams.append(Family(mode, seed, tuple(d_.k for d_ in draws), draws, columns=columns, basis=basis))
    return fams
