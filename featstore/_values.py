"""What a layer's values must satisfy before they are written, and what float16 keeps of them.

A chunk is written only when every value is finite and fits the storage dtype: float16 holds
magnitudes up to 65,504 (above, numpy's cast gives inf), so an overflow is one error naming
the layer, the largest value and the fix, before that chunk is written and with nothing
marked complete. float16 also keeps only 11 significant bits: a neuron with a large mean and a
small spread (ViTs' massive-activation dimensions: mean 600, sd 0.3) keeps a handful of
distinct values. That is not an error, but the build says so and records it in the group.
"""

from __future__ import annotations

import numpy as np

from .errors import Float16OverflowError, NonFiniteFeaturesError

__all__ = ["FLOAT16_MAX", "MIN_FLOAT16_LEVELS", "check_values", "SpreadTracker"]

FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504.0
# A neuron whose +-3 sd span covers fewer float16 steps (at its mean's magnitude) than this is
# reported as coarse: its stored values take about that many distinct levels.
MIN_FLOAT16_LEVELS = 64


def check_values(values: np.ndarray, dtype: str, *, layer: str, group: str, rows: tuple[int, int],
                 view: int) -> None:
    """Refuse a block of a layer's float32 outputs, shape (rows, neurons), that the group cannot
    store as they are: NaN / inf anywhere, or (float16) a magnitude above 65,504."""
    where = f"rows {rows[0]}..{rows[1]}" + (f" of augmented view {view}" if view else "")
    finite = np.isfinite(values)
    if not finite.all():
        r, c = np.argwhere(~finite)[0]
        raise NonFiniteFeaturesError(
            layer=layer, group=group, where_in=where, count=int((~finite).sum()),
            example=f"row {rows[0] + int(r)}, neuron {int(c)} = {values[r, c]}")
    if dtype == "float16":
        largest = float(np.abs(values).max()) if values.size else 0.0
        if largest > FLOAT16_MAX:
            r, c = np.unravel_index(int(np.argmax(np.abs(values))), values.shape)
            raise Float16OverflowError(
                layer=layer, group=group, where_in=where, largest=largest, neuron=int(c),
                count=int((np.abs(values) > FLOAT16_MAX).sum()))


class SpreadTracker:
    """Per-neuron sums (float64) of the float32 outputs one build run computes, to find the
    neurons float16 stores coarsely (:data:`MIN_FLOAT16_LEVELS`)."""

    def __init__(self, n_neurons: int):
        self.count = 0
        self.total = np.zeros(n_neurons)
        self.squares = np.zeros(n_neurons)

    def add(self, values: np.ndarray) -> None:
        v = values.astype(np.float64, copy=False)
        self.count += len(v)
        self.total += v.sum(axis=0)
        self.squares += np.einsum("ij,ij->j", v, v)

    def coarse(self, examples: int = 5) -> dict | None:
        """The neurons whose +-3 sd span holds fewer than MIN_FLOAT16_LEVELS float16 steps (not
        constant ones: those hold one value in any dtype), with a few examples; None if none."""
        if self.count < 2:
            return None
        mean = self.total / self.count
        sd = np.sqrt(np.maximum(self.squares / self.count - mean ** 2, 0.0))
        step = np.spacing(np.abs(mean).astype(np.float16)).astype(np.float64)  # the float16 gap at that magnitude
        levels = np.where(step > 0, 6 * sd / np.where(step > 0, step, 1.0), np.inf)
        # a spread below the float64 rounding of the sums is a constant neuron, not a coarse one
        constant = sd <= 1e-7 * np.maximum(np.abs(mean), 1e-30)
        coarse = np.flatnonzero((levels < MIN_FLOAT16_LEVELS) & ~constant)
        if not len(coarse):
            return None
        worst = coarse[np.argsort(levels[coarse])][:examples]
        return {"neurons": int(len(coarse)), "of": int(len(mean)), "min_levels": MIN_FLOAT16_LEVELS,
                "rows_checked": int(self.count),
                "examples": [{"neuron": int(j), "mean": float(mean[j]), "sd": float(sd[j]),
                              "float16_step": float(step[j]), "levels": float(round(levels[j], 1))} for j in worst]}
