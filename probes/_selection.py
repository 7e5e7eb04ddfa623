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

import warnings
from dataclasses import dataclass, field
from typing import Annotated, Callable, Literal, Sequence

import numpy as np
from pydantic import Field, field_validator

from featstore.errors import InvalidParameterError
from featstore.params import OneOf, Parameters, Rule, SeedValue, Unique, defaults, describe, validate

__all__ = ["Draw", "Family", "SelectionMode", "SELECTION_MODES", "Selection", "fractions_or_sizes", "PAPER_FRACTIONS", "make_families",
           "subset_size"]

# The paper's 22 fractions.
PAPER_FRACTIONS = (0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1,
                   0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.8, 0.9, 1.0)

Fraction = Annotated[float, Field(gt=0, le=1)]


def subset_size(fraction: float, d: int) -> int:
    """k = max(1, int(fraction * d)) (the original floors and can reach 0: guarded)."""
    if not isinstance(fraction, (int, float, np.floating, np.integer)) or isinstance(fraction, bool) \
            or not 0.0 < float(fraction) <= 1.0:
        raise InvalidParameterError(key="fraction", value=fraction, expected=describe(Fraction))
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
    rank : int or None
        PCA modes: the train split's rank (directions of non-negligible variance); k is
        at most this (a larger one is clamped, with a warning).
    """

    mode: str
    fraction: float | None
    k: int
    seed: int | None
    neurons: np.ndarray | None = field(default=None, compare=False, repr=False)
    projection: str | None = None
    rank: int | None = None

    def record(self) -> dict:
        return {"mode": self.mode, "fraction": self.fraction, "k": self.k, "seed": self.seed,
                "neurons": None if self.neurons is None else self.neurons.tolist(), "projection": self.projection,
                "rank": self.rank}


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


# Directions whose variance is below this share of the largest are null-space noise (a train
# split with n <= d has rank n - 1 after centring; eigh returns the rest at ~1e-12).
RANK_RTOL = 1e-9


def _pca_basis(X_train, d, least: bool):
    """The train split's principal directions (centred) of non-negligible variance, at most
    n - 1 of them: largest variance first (``pca``) or smallest first (``pca-least``, the
    smallest of the non-null ones, as the original's ``pca_lowrank(q=min(n, d))`` keeps)."""
    if X_train is None:
        raise InvalidParameterError(key="X_train", value=None,
                                    expected="the train features, to fit principal directions (mode 'pca')")
    X = np.asarray(X_train, dtype=np.float64)
    Xc = X - X.mean(axis=0)
    cov = Xc.T @ Xc / max(1, len(X) - 1)
    vals, vecs = np.linalg.eigh(cov)  # ascending
    top = np.argsort(vals)[::-1]
    rank = int(min(len(X) - 1, np.sum(vals > RANK_RTOL * max(vals.max(), 0.0))))
    kept = top[:rank]
    vecs = vecs[:, kept[::-1] if least else kept]
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


def _uniform_directions(d, k, g):
    import torch

    P = torch.rand((k, d), generator=g, dtype=torch.float64).T
    return P / P.norm(dim=0, keepdim=True)


def _gaussian_directions(d, k, g):
    import torch

    P = torch.randn((k, d), generator=g, dtype=torch.float64).T
    return P / P.norm(dim=0, keepdim=True)


def _released_directions(d, k, g):
    """The released code's matrix: ``F.normalize(torch.rand((d, d), generator), dim=0)[:, :k]``
    (float32, all d columns drawn, the first k kept)."""
    import torch

    return torch.nn.functional.normalize(torch.rand((d, d), generator=g), dim=0)[:, :k]


# how randproj directions are drawn: name -> directions(d, k, generator) -> (d, k) unit columns
RANDPROJ_DISTRIBUTIONS = {"uniform": _uniform_directions, "gaussian": _gaussian_directions,
                          "original": _released_directions}
Distribution = Literal["uniform", "gaussian", "original"]


def random_projection(d: int, k: int, seed: int, distribution: Distribution = "uniform") -> np.ndarray:
    """k seeded random directions (d x k), each column scaled to unit norm.

    ``uniform``: entries uniform in [0, 1) (the paper's description), drawn column by column
    in float64; ``gaussian``: N(0, 1) entries; ``original``: exactly the released code's
    matrix, ``F.normalize(torch.rand((d, d), generator=torch.Generator().manual_seed(seed)),
    dim=0)[:, :k]``. In every case the first k columns of a wider draw equal a k-column
    draw with the same seed.
    """
    import torch

    if distribution not in RANDPROJ_DISTRIBUTIONS:
        raise InvalidParameterError(key="distribution", value=distribution, expected=describe(Distribution))
    P = RANDPROJ_DISTRIBUTIONS[distribution](d, k, torch.Generator().manual_seed(int(seed)))
    return P.numpy().astype(np.float32)


def _randproj_ordering(X_train, d, seed, options):
    return None, random_projection(d, options["width"], seed, options["distribution"])


@dataclass(frozen=True)
class SelectionMode:
    """One entry of the selection-mode registry.

    Attributes
    ----------
    name : str
    ordering : callable
        ``ordering(X_train, d, seed, options) -> (columns or None, basis or None)``: one
        ordering of the layer, cut at every k.
    seeded : bool
        One family per seed (``random``, ``randproj``); otherwise one family in all.
    projection : bool
        Probes see directions (``basis``), not neurons (``columns``).
    description : str
    """

    name: str
    ordering: Callable
    seeded: bool
    projection: bool
    description: str


SELECTION_MODES: dict[str, SelectionMode] = {m.name: m for m in (
    SelectionMode("random", _random_ordering, True, False, "seeded random neurons (the paper's torch.randperm)"),
    SelectionMode("prefix", _prefix_ordering, False, False, "the first k neurons in the layer's order"),
    SelectionMode("pca", _pca_ordering, False, True, "the train split's top-k principal directions"),
    SelectionMode("pca-least", _pca_least_ordering, False, True, "the k directions of least variance"),
    SelectionMode("randproj", _randproj_ordering, True, True, "k seeded random unit directions"),
)}


def fractions_or_sizes(sizes, info):
    """The rule between fractions and sizes (a validator of ``sizes``, declared fields
    before it): at least one of them draws something."""
    if not sizes and not info.data.get("fractions", (1.0,)):
        raise Rule("fractions is empty and so is sizes: give at least one fraction or size")
    return sizes


class Selection(Parameters):
    """Which neurons (or directions) the probes see: the selection half of ``SubsetProbes``
    and of a sweep's ``[selection]`` table."""

    mode: Annotated[str, OneOf(SELECTION_MODES, "selection mode")] = "random"
    """Selection mode: random, prefix, pca, pca-least or randproj (ignored when subsets is given)."""
    fractions: Annotated[tuple[Fraction, ...], Field(strict=False), Unique()] = PAPER_FRACTIONS
    """Fractions of the layer, each in (0, 1]; k = max(1, int(f * d)). Default: the paper's 22."""
    sizes: Annotated[tuple[Annotated[int, Field(ge=1)], ...], Field(strict=False, validate_default=True), Unique()] = ()
    """Absolute numbers of neurons k (the Matryoshka comparisons' 8 ... 1024), beside or instead of fractions
    (fractions = [] for sizes only); nested per seed like fractions, each at most the layer's width."""
    seeds: Annotated[tuple[SeedValue, ...], Field(min_length=1, strict=False),
                     Unique()] = (0, 1, 2, 3, 4)
    """One draw family per seed (seeded modes: random, randproj)."""
    _fractions_or_sizes = field_validator("sizes")(fractions_or_sizes)

    randproj_distribution: Distribution = "uniform"
    """randproj directions: uniform [0, 1) entries (the paper's description), gaussian, or original (exactly the
    released code's matrix for a seed)."""


_SELECTION = defaults(Selection)


def make_families(
    d: int,
    mode: str = _SELECTION["mode"],
    fractions: Sequence[float] = _SELECTION["fractions"],
    seeds: Sequence[int] = _SELECTION["seeds"],
    X_train=None,
    subsets: Sequence[Sequence[int]] | None = None,
    randproj_distribution: str = _SELECTION["randproj_distribution"],
    sizes: Sequence[int] = _SELECTION["sizes"],
) -> list[Family]:
    """Expand (mode, fractions and/or sizes, seeds) or explicit index lists into families of draws.

    Parameters
    ----------
    d : int
        Neurons in the layer.
    mode : str
        One of ``SELECTION_MODES`` (ignored when ``subsets`` is given).
    fractions : sequence of float in (0, 1]
    sizes : sequence of int in 1..d
        Absolute k; a size's draw records the fraction k/d.
    seeds : sequence of non-negative int
    X_train : array, optional
        Train features, needed by ``pca`` / ``pca-least``.
    subsets : sequence of index arrays, optional
        Explicit neuron lists (mode ``explicit``), one family each.
    """
    if subsets is not None:
        fams = []
        for i, s in enumerate(subsets):
            idx = check_indices(s, d, f"subsets[{i}]")
            draw = Draw("explicit", None, len(idx), None, neurons=idx.copy())
            fams.append(Family("explicit", None, (len(idx),), [draw], columns=idx.copy()))
        return fams
    sel = validate(Selection, dict(mode=mode, fractions=fractions, seeds=seeds, sizes=sizes,
                                   randproj_distribution=randproj_distribution))
    for i, k in enumerate(sel.sizes):
        if k > d:
            raise InvalidParameterError(key=f"sizes[{i}]", value=k, expected=f"an integer in 1..{d} (the layer's neurons)")
    # (fraction recorded, k) of every draw, by k: a size records its effective fraction k/d
    wanted = sorted([(float(f), subset_size(f, d)) for f in sel.fractions] + [(k / d, k) for k in sel.sizes],
                    key=lambda fk: (fk[1], fk[0]))
    ks = [k for _, k in wanted]
    entry = SELECTION_MODES[mode]
    fams = []
    for seed in (sel.seeds if entry.seeded else (None,)):
        columns, basis = entry.ordering(X_train, d, seed, {"width": max(ks), "distribution": randproj_distribution})
        available = len(columns) if columns is not None else basis.shape[1]
        rank = available if mode.startswith("pca") else None
        clamped = [f for f, k in wanted if k > available]
        if clamped:
            warnings.warn(f"mode {mode!r}: the train split has rank {available} ({len(X_train)} samples, {d} "
                          f"neurons), so fractions {', '.join(f'{f:g}' for f in clamped)} are clamped to k = "
                          f"{available} directions (recorded as the draws' k and rank)", stacklevel=3)
        draws = []
        for f, k in wanted:  # two fractions that floor to one k give two identical draws
            k = min(k, available)
            if columns is not None:
                draws.append(Draw(mode, float(f), k, seed, neurons=np.asarray(columns[:k])))
            else:
                how = (f"train-split principal directions, {'largest' if mode == 'pca' else 'smallest'} variance first"
                       if mode.startswith("pca") else f"{randproj_distribution} random directions, seed {seed}")
                draws.append(Draw(mode, float(f), k, seed, projection=how, rank=rank))
        fams.append(Family(mode, seed, tuple(d_.k for d_ in draws), draws, columns=columns, basis=basis))
    return fams


def check_indices(indices, d: int, key: str) -> np.ndarray:
    """A subset of neuron indices as a 1-D integer array, checked against a layer of d neurons."""
    idx = np.asarray(indices)
    expected = f"a non-empty 1-D array of distinct integer neuron indices in 0..{d - 1}"
    if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer) or idx.min() < 0 \
            or idx.max() >= d or len(np.unique(idx)) != len(idx):
        shown = idx.tolist() if idx.size <= 8 else f"array of shape {idx.shape}, dtype {idx.dtype}"
        raise InvalidParameterError(key=key, value=shown, expected=expected)
    return idx
