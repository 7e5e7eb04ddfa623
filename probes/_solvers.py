"""The solver registry: how a fit trains every probe of its draws together.

Each entry's ``fit(est, data, train_idx, val_idx, device)`` trains every draw of the
estimator ``est`` (its ``families_``, ``draws_``, ``streams_``, initial weights and
minibatch orders) and leaves it fitted: ``batches_`` holding each probe's weights,
``positions_``, and per draw ``val_accuracy_``, ``best_epoch_`` and ``train_loss_`` (NaN
where the solver has no iterative loss). A new solver is an entry here and a module of
its own; ``Protocol.solver`` accepts exactly the registered names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ._knn import check_ks, fit_knn, knn_scores
from ._lbfgs import fit_lbfgs
from ._ridge import fit_ridge
from ._sgd import fit_sgd

__all__ = ["Solver", "SOLVERS"]


@dataclass(frozen=True)
class Solver:
    """One registered solver.

    Attributes
    ----------
    name : str
    fit : callable
        ``fit(est, data, train_idx, val_idx, device)``: trains every draw of ``est``.
    several_layers : bool
        Trains the batches of several layers of the same rows (a joint fit's sources) in one
        pass; otherwise ``fit_together`` fits each layer's estimators apart.
    reads_from_disk : bool
        Can train on features too large for ``max_memory_mb``, read by minibatch (index modes).
    precisions : tuple of str
        The ``precision`` values it runs at.
    few_shot : bool
        Trains each seed's probes on that seed's rows (``shots``).
    sgd_grid : bool
        Trains every probe under each pair of ``lrs`` x ``weight_decays`` in one pass.
    joint : bool
        ``fit_together`` trains the draws of several estimators in one pass; otherwise it fits
        each estimator alone.
    scores : callable or None
        ``scores(est, features) -> (n, draws, classes)``: what inference ranks, for a solver
        whose probes are no linear layer (None: the logits of the fitted weights).
    check_rows : callable or None
        ``check_rows(est, train_rows)``: refuses, before any work, a protocol that many train
        rows cannot serve (``SubsetProbes.check_rows``).
    description : str
    """

    name: str
    fit: Callable
    several_layers: bool
    reads_from_disk: bool
    precisions: tuple
    few_shot: bool
    sgd_grid: bool
    description: str
    joint: bool = True
    scores: Callable | None = None
    check_rows: Callable | None = None


SOLVERS: dict[str, Solver] = {s.name: s for s in (
    Solver("sgd", fit_sgd, several_layers=True, reads_from_disk=True, precisions=("fp32", "bf16"),
           few_shot=True, sgd_grid=True,
           description="the paper's protocol: SGD with momentum and weight decay on each probe's mean "
                       "cross-entropy, the best validation epoch kept"),
    Solver("ridge", fit_ridge, several_layers=False, reads_from_disk=False, precisions=("fp32", "bf16"),
           few_shot=False, sgd_grid=False,
           description="closed-form ridge regression to one-hot targets from the train Gram, regularisation "
                       "chosen on the validation split; a fast screening solver"),
    Solver("lbfgs", fit_lbfgs, several_layers=True, reads_from_disk=False, precisions=("fp32",),
           few_shot=False, sgd_grid=False,
           description="multinomial logistic regression with an L2 penalty (scikit-learn's LogisticRegression "
                       "objective), full batch, L-BFGS per probe; C chosen per probe from Cs on the validation "
                       "split (CLIP's and DINOv2's linear-probe protocol)"),
    Solver("knn", fit_knn, several_layers=False, reads_from_disk=False, precisions=("fp32",), few_shot=True,
           sgd_grid=False, joint=False, scores=knn_scores, check_rows=check_ks,
           description="a weighted k-nearest-neighbour vote on cosine similarity over the probe's inputs "
                       "(knn_weights: DINOv2's temperature softmax, scikit-learn's 1 / distance, or uniform); k "
                       "chosen per probe from ks on the validation split"),
)}
