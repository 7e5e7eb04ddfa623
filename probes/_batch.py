"""The engine's layout: families of equal prefix lengths as one batch (``_ProbeBatch``),
their column blocks, dense batches and the minibatch every probe of a step reads
(``_Minibatch``). See ``probes._engine`` for the whole design."""

from __future__ import annotations

import math

import numpy as np

from ._inputs import RowFile
from ._selection import Family

__all__ = ["_ProbeBatch", "_Minibatch", "_blocks", "MIN_BLOCK_WIDTH", "MIN_BLOCK_WIDTH_CUDA", "MIN_BLOCK_WIDTH_BF16",
           "LAYOUT_MIN_EPOCHS", "DENSE_FRACTION", "cpu_has_bf16"]


# Narrowest column block on the CPU and CUDA: consecutive segments are merged until a
# block is at least this wide (tiny segments make GEMMs that are all overhead).
MIN_BLOCK_WIDTH = 64
# On CUDA a GEMM costs its latency more than its arithmetic: wider blocks, fewer products. Measured on
# an H200, paper grid with CUDA graphs (benchmarks/bench_probes.py at paper scale, block widths 64 / 256 /
# 1024 / 4096):
# fp32 3.69 / 3.20 / 2.97 / 2.97 s, TF32 3.02 / 2.47 / 2.16 / 2.19 s.
MIN_BLOCK_WIDTH_CUDA = 1024
# bf16 operands on the CPU (oneDNN / AMX): wider blocks pay. Measured on 2 Xeon cores with AMX, paper grid,
# seconds per epoch: 64: 0.95-1.01, 128: 0.83-0.90, 256: 0.86.
MIN_BLOCK_WIDTH_BF16 = 128
# Laying the passes out by column block costs about one epoch of per-minibatch column gathers, so on the
# CPU in float32 it is done only where it pays: for several minibatch streams (per-seed orders) over at
# least this many epochs. Measured on 2 Xeon cores, paper grid (n = 45,000, d = 2048, 22 x 5): per-seed
# 1.31 vs 1.45 s per epoch for +1.3 s once; shared order 0.91-0.92 vs 0.92-0.94 s per epoch (no gain);
# the default benchmark (23 seeds, 3 epochs) 5.07-5.26 vs 4.90-5.11 s (no gain). Projections (one
# projection per pass instead of one per minibatch), bf16 operands (no per-step conversion: 0.85 vs
# 1.75 s per epoch at paper scale) and CUDA always lay out.
LAYOUT_MIN_EPOCHS = 10
# Index probes with k >= DENSE_FRACTION * d are trained in the layer's own neuron order,
# all families together, as one GEMM on the untouched minibatch (zero weights on the
# neurons a probe does not see): no gather, and a wide product instead of many thin ones.
DENSE_FRACTION = 0.75


def _blocks(lengths: tuple[int, ...], min_width: int) -> list[tuple[int, int, int]]:
    """Column blocks (first probe a, lo, hi) covering the prefix cuts ``lengths``.

    Segment j is [lengths[j-1], lengths[j]); consecutive segments merge until a block is
    ``min_width`` wide. Block (a, lo, hi) feeds probes a..m-1; a probe i < last segment of
    the block uses only its columns below lengths[i] (the rest is masked to zero).
    """
    m = len(lengths)
    starts = [0] + list(lengths[:-1])
    out, a = [], 0
    while a < m:
        lo, b = starts[a], a + 1
        while b < m and lengths[b - 1] - lo < min_width:
            b += 1
        if lengths[b - 1] > lo:
            out.append((a, lo, lengths[b - 1]))
        a = b
    return out


class _ProbeBatch:
    """Families with equal prefix lengths, trained as one batch.

    Block inputs are samples first, one contiguous (F, B, hi - lo) tensor per block
    (``inputs``); block weights Wt_k are (F, (m - a) * C, hi - lo) and the logits (F, m * C, B),
    samples last, so that a block's product adds to a contiguous run of rows per family.
    Rows (i - a) * C ... of Wt_k belong to probe i.
    All block weights and the biases are views of one flat tensor, so an optimiser step
    is one fused pass.
    """

    def __init__(self, families: list[Family], lengths: tuple[int, ...], n_classes: int, device, dtype,
                 min_block: int | None = None, dense: list[list[np.ndarray]] | None = None,
                 streams: list[int] | None = None):
        import torch

        self.families = families
        self.lengths = lengths
        self.m = len(lengths)
        self.C = n_classes
        self.F = len(families)
        width = lengths[-1]
        self.width = width
        self.device = device
        self.is_index = all(f.columns is not None for f in families)
        # the minibatch stream each family reads (its seed's order); families of one stream are
        # consecutive, so each stream's inputs fill one contiguous slice of the input buffer
        streams = [0] * self.F if streams is None else list(streams)
        if streams != sorted(streams):
            raise ValueError("internal: families must be sorted by stream")  # pragma: no cover - a bug
        self.family_stream = torch.as_tensor(streams, device=device)
        self.family_offsets = torch.arange(self.F, device=device)
        self.streams_are_all = streams == list(range(len(streams)))  # family f reads stream f
        self.stream_slices = [(sigma, streams.index(sigma), len(streams) - streams[::-1].index(sigma))
                              for sigma in sorted(set(streams))]
        # dense: pseudo-families whose probe i sees neurons dense[f][i] of the raw layer
        self.dense = dense
        if dense is not None:
            self.is_index = False
            self.blocks = [(0, 0, width)]
            seen = np.zeros((self.F, self.m, width), dtype=bool)
            for f, probes_of_f in enumerate(dense):
                for i, idx in enumerate(probes_of_f):
                    seen[f, i, idx] = True
            masks = [np.repeat(seen, self.C, axis=1)]
        else:
            if self.is_index:
                self.columns = torch.as_tensor(np.concatenate([f.columns[:width] for f in families]), device=device)
                self.slice_columns = [self.columns[f0 * width:f1 * width] for _, f0, f1 in self.stream_slices]
            else:
                self.basis_t = torch.as_tensor(np.concatenate([f.basis[:, :width] for f in families], axis=1).T.copy(),
                                               device=device, dtype=torch.float32)
            if min_block is None:
                min_block = MIN_BLOCK_WIDTH_CUDA if str(device).startswith("cuda") else \
                    MIN_BLOCK_WIDTH_BF16 if dtype is not None else MIN_BLOCK_WIDTH
            self.blocks = _blocks(lengths, min_block)
            # a merged block's columns beyond a probe's prefix are not the probe's
            masks = [np.repeat(np.stack([np.arange(lo, hi) < lengths[i] for i in range(a, self.m)]), self.C, axis=0)
                     for a, lo, hi in self.blocks]
        # gradient masks: True where a weight is the probe's, False where it is held at zero
        # as float 0 / 1, not bool: multiplying by a bool tensor converts it on every step
        self.masks = [None if mk.all() else torch.as_tensor(mk, device=device, dtype=torch.float32) for mk in masks]
        self.shapes = [(self.F, (self.m - a) * self.C, hi - lo) for a, lo, hi in self.blocks] + [(self.F, self.m * self.C)]
        self.flat = torch.zeros(self.n_params, device=device)
        self.W, self.b = self.views(self.flat)
        self.compute_dtype = dtype
        # the dtype inputs are held in for the products: bf16 resident with precision="bf16"
        self.operand_dtype = dtype if dtype is not None else torch.float32
        self.laid = None  # each pass laid out by column block while training (lay_out)
        self.source = 0  # which features of a joint fit it reads (probes.fit_together: one per layer)

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def views(self, flat):
        """([Wt_k], b) as views of a flat tensor laid out like the parameters."""
        out, at = [], 0
        for s in self.shapes:
            n = math.prod(s)
            out.append(flat[at:at + n].view(s))
            at += n
        return out[:-1], out[-1]

    def set_flat(self, flat):
        self.flat = flat
        self.W, self.b = self.views(flat)

    def input_buffer(self, B: int, device):
        """Work space of ``inputs``: one contiguous (F, B, hi - lo) tensor per column block, in
        the operand dtype (None for a dense batch, which reads the minibatch itself)."""
        import torch

        if self.dense is not None:
            return None
        return [torch.empty((self.F, B, hi - lo), device=device, dtype=self.operand_dtype)
                for _, lo, hi in self.blocks]

    def inputs(self, mb: "_Minibatch | None", out=None, rows=None, pass_index: int = 0):
        """Every family's inputs for the minibatch: one (F, B, hi - lo) tensor per column block,
        samples first, in the operand dtype.

        A dense batch gives the minibatch rows themselves (one block, the raw layer). Otherwise
        each block's tensor is contiguous, so a block's products are plain batched GEMMs (no
        strided batch, no copy inside BLAS/oneDNN). With the passes laid out (``lay_out``), a
        block's inputs are one row gather ``rows[stream]`` from the laid-out pass ``pass_index``
        (``mb`` is not needed); otherwise they come from the minibatch ``mb``: its columns (index
        modes) or its projection. Both fill the same tensors with the same values, so the
        products and the probes are the same either way. ``out`` (``input_buffer``), when given,
        is reused: fresh tensors this large per minibatch cost page faults on every step.
        """
        import torch

        F = self.F
        if self.dense is not None:
            if len(self.stream_slices) == 1:
                Z = mb.r(self.stream_slices[0][0]).unsqueeze(0).expand(F, -1, -1)
            else:
                # family f reads stream f only when the batch holds every stream (a joint fit's dense
                # batch may hold the streams of one draw count only)
                every = self.streams_are_all and mb.streams == F
                Z = mb.stacked() if every else mb.stacked().index_select(0, self.family_stream)
            return [Z if self.compute_dtype is None else Z.to(self.compute_dtype)]
        if self.laid is not None and rows is not None:
            B = rows[0].shape[0]
            out = out if out is not None else self.input_buffer(B, rows[0].device)
            n = self.laid[pass_index][0].shape[1]
            # row f * n + r of a block's (F * n, width) matrix is family f's row r; family f reads its stream's rows
            idx = (self.family_offsets.view(F, 1) * n + torch.stack(rows).index_select(0, self.family_stream)).view(-1)
            for Lk, Zk in zip(self.laid[pass_index], out):
                torch.index_select(Lk.view(F * n, -1), 0, idx, out=Zk.view(F * B, -1))
            return out
        B, w = mb.B, self.width
        out = out if out is not None else self.input_buffer(B, mb.device)
        for j, (sigma, f0, f1) in enumerate(self.stream_slices):
            X = mb.r(sigma)
            if self.is_index:  # (B, F_sigma * width): each family's columns, in its order
                part = torch.index_select(X, 1, self.slice_columns[j])
            else:
                part = torch.mm(X, self.basis_t[f0 * w:f1 * w].t())
            part = part.view(B, f1 - f0, w).transpose(0, 1)
            for (_, lo, hi), Zk in zip(self.blocks, out):
                Zk[f0:f1].copy_(part[:, :, lo:hi])
        return out

    def targets(self, ys):
        """(F, 1, 1, B) class of each family's minibatch rows, from ``ys`` (streams, B)."""
        if len(self.stream_slices) == 1:
            return ys[self.stream_slices[0][0]].view(1, 1, 1, -1).expand(self.F, 1, 1, -1)
        return ys.index_select(0, self.family_stream).view(self.F, 1, 1, -1)

    @property
    def is_projection(self) -> bool:
        return self.dense is None and not self.is_index

    def laid_out_bytes(self, passes) -> int:
        """Memory ``lay_out`` takes for ``passes``: every pass, n x F x width operands."""
        import torch

        if self.dense is not None:
            return 0
        size = torch.empty((), dtype=self.operand_dtype).element_size()
        return sum(p.shape[0] for p in passes) * self.F * self.width * size

    def lay_out(self, passes, rows_per_chunk: int = 8192) -> None:
        """Lay every pass (n, d) out once, by column block, on the batch's device: per block a
        contiguous (F, n, hi - lo) tensor whose row r is family f's inputs of sample r (its
        columns in its own order, or its projection), in the operand dtype. ``inputs`` then
        gathers rows instead of gathering (or projecting) the columns of every minibatch of every
        epoch. The caller checks the room (``laid_out_bytes``). ``lay_out([])`` drops them."""
        import torch

        self.laid = None
        if not passes or self.dense is not None:
            return
        device = self.columns.device if self.is_index else self.basis_t.device
        w = self.width
        laid = []
        for X in passes:
            n = X.shape[0]
            blocks = [torch.empty((self.F, n, hi - lo), device=device, dtype=self.operand_dtype)
                      for _, lo, hi in self.blocks]
            # float32 work space, reused (a fresh tensor per chunk costs its page faults every time)
            tmp = torch.empty((min(n, rows_per_chunk), w), device=device)
            for s in range(0, n, rows_per_chunk):
                Xs = X[s:s + rows_per_chunk].to(device)
                e = s + len(Xs)
                for f in range(self.F):
                    if self.is_index and self.operand_dtype == torch.float32:  # straight into place
                        for (_, lo, hi), Lk in zip(self.blocks, blocks):
                            torch.index_select(Xs, 1, self.columns[f * w + lo:f * w + hi], out=Lk[f, s:e])
                        continue
                    if self.is_index:
                        part = torch.index_select(Xs, 1, self.columns[f * w:(f + 1) * w], out=tmp[:len(Xs)])
                    else:
                        part = torch.mm(Xs, self.basis_t[f * w:(f + 1) * w].t(), out=tmp[:len(Xs)])
                    for (_, lo, hi), Lk in zip(self.blocks, blocks):
                        Lk[f, s:e].copy_(part[:, lo:hi])
            laid.append(blocks)
        self.laid = laid

    def chunk_rows(self, budget: int = 1 << 25) -> int:
        """Rows per inference chunk so that inputs and logit buffers stay near ``budget`` floats."""
        per_row = self.F * (self.width + self.m * self.C)
        return int(max(64, min(4096, budget // per_row)))

    def logit_buffers(self, B: int, device=None):
        """Work space of ``logits``: the (F, m * C, B) logits, in the parameters' dtype."""
        import torch

        return torch.empty((self.F, self.m * self.C, B), device=device or self.device, dtype=self.flat.dtype)

    def logits(self, zs, out=None):
        """(F, m*C, B) logits of every probe, from the block inputs ``zs`` (``inputs``).

        The logits start at the biases; then each block, from the last (fewest probes) to the
        first, adds its products to the rows of its probes a_k..m-1 in place: one batched GEMM
        per block, no copies between blocks. Every probe's sum is bias + block K-1 + ... +
        block 0, in that order. With bf16 operands the weights are converted once per call and
        each block's bf16 product is added to the float32 sums.
        """
        import torch

        b = self.b
        W = self.W if self.compute_dtype is None else self.views(self.flat.to(self.compute_dtype))[0]
        B = zs[0].shape[1]
        out = out if out is not None else self.logit_buffers(B, zs[0].device)
        C, F = self.C, self.F
        out.copy_(b.unsqueeze(2).expand(F, self.m * C, B))
        for k in range(len(self.blocks) - 1, -1, -1):
            a = self.blocks[k][0]
            part, w, zk = out[:, a * C:, :], W[k], zs[k]
            if zk.stride(0) == 0 and F > 1 and a == 0:  # every family reads the same rows (a dense batch's
                # shared minibatch, validation): one product for all, (F * rows, width) x (width, B)
                flat_out, flat_w = out.view(F * out.shape[1], B), w.reshape(F * w.shape[1], w.shape[2])
                if self.compute_dtype is not None:
                    flat_out += torch.mm(flat_w, zk[0].t())
                else:
                    flat_out.addmm_(flat_w, zk[0].t())
            elif self.compute_dtype is not None:  # oneDNN: (B, width) x (width, rows) is its faster form
                part += torch.bmm(zk, w.transpose(1, 2)).transpose(1, 2)
            else:
                part.baddbmm_(w, zk.transpose(1, 2))
        return out

    def grads(self, zs, dlogits, gW, gb, scale: float):
        """Write ``scale`` x the gradients of every Wt_k and of b into gW, gb, from dlogits
        (F, m*C, B) and the block inputs ``zs``."""
        import torch

        F = self.F
        for (a, lo, hi), zk, g, mask in zip(self.blocks, zs, gW, self.masks):
            dk = dlogits[:, a * self.C:, :]
            if zk.stride(0) == 0 and F > 1 and a == 0:  # the same rows for every family: one product
                rows = F * dk.shape[1]
                if self.compute_dtype is not None:
                    torch.mul(torch.mm(dk.reshape(rows, -1).to(self.compute_dtype), zk[0]), scale,
                              out=g.view(rows, -1))
                else:
                    torch.addmm(g.view(rows, -1), dk.reshape(rows, -1), zk[0], beta=0, alpha=scale,
                                out=g.view(rows, -1))
            elif self.compute_dtype is not None:  # a contiguous bf16 copy: oneDNN's batched GEMM runs on it as is
                torch.mul(torch.bmm(dk.to(self.compute_dtype), zk), scale, out=g)
            else:
                torch.baddbmm(g, dk, zk, beta=0, alpha=scale, out=g)
            if mask is not None:
                g.mul_(mask)
        torch.sum(dlogits, dim=2, out=gb)
        gb.mul_(scale)

    def probe_slices(self, i):
        """Where probe i's weights live: [(block k, row slice of Wt_k, its columns lo..hi_i)] for blocks a <= i."""
        out = []
        for k, (a, lo, hi) in enumerate(self.blocks):
            if a <= i and self.lengths[i] > lo:
                out.append((k, slice((i - a) * self.C, (i - a + 1) * self.C), lo, min(hi, self.lengths[i])))
        return out

    def write_probe(self, flat, fi: int, i: int, w, b) -> None:
        """Write probe i of family fi into ``flat`` (laid out like the parameters, any dtype):
        weight (k, C) in its own input order, bias (C,)."""
        import torch

        W, bias = self.views(flat)
        w = torch.as_tensor(w, dtype=flat.dtype, device=flat.device)
        rows = slice(i * self.C, (i + 1) * self.C)
        if self.dense is not None:
            W[0][fi, rows, :] = 0.0
            W[0][fi, rows, torch.as_tensor(self.dense[fi][i], device=flat.device)] = w.T
        else:
            for k, r, lo, hi in self.probe_slices(i):
                W[k][fi, r, :hi - lo] = w[lo:hi].T
        bias[fi, rows] = torch.as_tensor(b, dtype=flat.dtype, device=flat.device)

    def read_probe(self, flat, fi: int, i: int):
        """Probe i of family fi in ``flat``: (weight (k, C) in its own input order, bias (C,)) as
        tensors of flat's dtype."""
        import torch

        W, bias = self.views(flat)
        rows = slice(i * self.C, (i + 1) * self.C)
        if self.dense is not None:
            w = W[0][fi, rows, :].T[torch.as_tensor(self.dense[fi][i], device=flat.device)]
        else:
            w = flat.new_zeros((self.lengths[i], self.C))
            for k, r, lo, hi in self.probe_slices(i):
                w[lo:hi] = W[k][fi, r, :hi - lo].T
        return w, bias[fi, rows].clone()

    def set_probe(self, fi: int, i: int, w, b) -> None:
        """Write probe i of family fi: weight (k, C) in its own input order, bias (C,)."""
        self.write_probe(self.flat, fi, i, w, b)

    def probe_weights(self, fi: int, i: int):
        """Probe i of family fi: (weight (k, C) in its own input order, bias (C,)) as numpy arrays."""
        w, b = self.read_probe(self.flat, fi, i)
        return np.ascontiguousarray(w.cpu().numpy(), dtype=np.float32), b.cpu().numpy()

    def in_dtype(self, dtype):
        """Parameters, operands, masks and basis in ``dtype`` (float64 for a solver that converges
        past float32's resolution; float32 again for inference)."""
        self.operand_dtype = dtype
        self.masks = [None if m is None else m.to(dtype) for m in self.masks]
        if self.is_projection:
            self.basis_t = self.basis_t.to(dtype)
        self.set_flat(self.flat.to(dtype))
        return self

    def to(self, device):
        self.family_stream = self.family_stream.to(device)
        self.family_offsets = self.family_offsets.to(device)
        if self.is_index:
            self.columns = self.columns.to(device)
            w = self.width
            self.slice_columns = [self.columns[f0 * w:f1 * w] for _, f0, f1 in self.stream_slices]
        elif self.is_projection:
            self.basis_t = self.basis_t.to(device)
        self.masks = [None if m is None else m.to(device) for m in self.masks]
        self.set_flat(self.flat.to(device))
        self.device = device
        return self


class _Minibatch:
    """One step's rows for every minibatch stream (each seed's order, or one shared).

    ``rows_major`` is (streams, B, d), or (B, d) when every stream reads the same rows
    (one stream, validation, inference). ``r(stream)`` is a stream's (B, d) rows,
    ``stacked()`` the (streams, B, d) view of all of them.
    """

    def __init__(self, rows_major, n_streams: int):
        self._rows = rows_major
        self.streams = n_streams
        self.shared = rows_major.dim() == 2
        self.B = rows_major.shape[-2]
        self.device = rows_major.device

    @classmethod
    def gather(cls, Xp, rows, device, out=None):
        """The minibatch of ``rows[stream]`` of pass Xp, one gather; into ``out`` ((streams * B, d),
        reused every step: a fresh tensor this large per step costs page faults) when it fits."""
        import torch

        every = rows[0] if len(rows) == 1 else torch.cat(rows)
        if out is not None and isinstance(Xp, torch.Tensor) and Xp.device == out.device and \
                Xp.dtype == out.dtype and every.shape[0] == out.shape[0]:
            X = torch.index_select(Xp, 0, every, out=out)
        else:
            X = Xp.index_select(0, every.to(Xp.device)).to(device, non_blocking=True)
        return cls(X if len(rows) == 1 else X.view(len(rows), len(rows[0]), -1), len(rows))

    @staticmethod
    def labels(y_all, rows):
        """(streams, B) labels of ``rows[stream]``."""
        import torch

        return y_all[rows[0]].view(1, -1) if len(rows) == 1 else y_all[torch.cat(rows)].view(len(rows), -1)

    def r(self, stream: int):
        return self._rows if self.shared else self._rows[stream]

    def stacked(self):
        return self._rows.unsqueeze(0).expand(self.streams, -1, -1) if self.shared else self._rows


def _layout_pays(g: _ProbeBatch, device: str, epochs: int) -> bool:
    """Whether laying g's passes out by column block pays (``LAYOUT_MIN_EPOCHS``)."""
    if g.dense is not None:
        return False
    return g.is_projection or device != "cpu" or g.compute_dtype is not None or \
        (len(g.stream_slices) > 1 and epochs >= LAYOUT_MIN_EPOCHS)


def _room_for(need: int, budget: int, device: str) -> bool:
    """Whether ``need`` more bytes of laid-out inputs fit: within ``budget`` (what is left of
    max_memory_mb on the CPU) and, on a GPU, under a quarter of its free memory."""
    import torch

    if need > budget:
        return False
    if device.startswith("cuda"):
        return need < 0.25 * torch.cuda.mem_get_info(device)[0]
    return True


def cpu_has_bf16() -> bool:
    """Whether this CPU does bf16 matmuls natively (otherwise torch emulates them, slowly)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _to_device(X: np.ndarray, device: str):
    """The whole pass on the device when it fits comfortably, else pinned host memory
    from which each minibatch is copied (features larger than device memory)."""
    import torch

    if isinstance(X, RowFile):  # on disk: each minibatch reads its rows and is copied over
        return X
    t = torch.from_numpy(X)
    if device == "cpu":
        return t
    free, _ = torch.cuda.mem_get_info()
    if t.numel() * 4 < 0.5 * free:
        return t.to(device)
    return t.pin_memory()
