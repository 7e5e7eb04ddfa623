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
    iterative : bool
        Trains by epochs (a best epoch and a training loss per probe), rather than in closed form.
    reads_from_disk : bool
        Can train on features too large for ``max_memory_mb``, read by minibatch (index modes).
    description : str
    """

    name: str
    fit: Callable
    iterative: bool
    reads_from_disk: bool
    description: str


SOLVERS: dict[str, Solver] = {s.name: s for s in (
    Solver("sgd", fit_sgd, iterative=True, reads_from_disk=True,
           description="the paper's protocol: SGD with momentum and weight decay on each probe's mean "
                       "cross-entropy, the best validation epoch kept"),
    Solver("ridge", fit_ridge, iterative=False, reads_from_disk=False,
           description="closed-form ridge regression to one-hot targets from the train Gram, regularisation "
                       "chosen on the validation split; a fast screening solver"),
)}
