"""Fused linear cross-entropy in float64, without the (N, V) logits ever existing whole.

Row n of the hidden states H (N, H) against the weight W (V, H) and bias b:

    z_n = W h_n + b,   loss_n = Q_n * lse(z_n) - q_n . z_n,   G_n = dloss/dz_n = s * (Q_n a_n - q_n)

with a_n = softmax(z_n), index targets q_n = (1 - eps) w_y e_y + (eps / V) w (PyTorch
`F.cross_entropy` on `F.linear(H, W, b)`: class weights w, label smoothing eps, ignore_index)
and s the reduction's 1/D. Then dL/dH = G W, dL/dW = G^T H, dL/db = sum_n G_n.

Blocks: a block of R rows forms its logits one vocabulary block at a time (W converted to
float64 block by block, BLAS through numpy), updating the row normaliser online
(m = running max, s = sum exp(z - m), rescaled when m grows); `grad_terms` then turns any
(rows x vocabulary) block of logits into G and its error floor. Memory: one (R, V) block.

Where later semantics slot in: a logit map (softcap, logit scale) goes into `logits` (z from
the raw product) and `grad_terms` (the chain rule's dz/dz_raw factor on G); a per-row term
such as z-loss changes Q_n's coefficient of a_n in `grad_terms` and `row_loss`; a different
denominator or per-sample weights change `denominator` / the row factor in `targets`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ce_cli.errors import CeCheckError
from ce_cli.kernels.base import ChunkEval
from ce_cli.kernels.numerics import EPS, THIRD_MOMENT_MAX
from ce_cli.kernels.numpy_softmax import transform
from ce_cli.models.base import REDUCTIONS
from ce_cli.models.semantics import fd_error_bound
from ce_cli.models.semantics import Semantics
from ce_cli.models.softmax import build_softmax_ce

BLOCK_BYTES = 256 << 20   # one row block's float64 logits (W is converted once per row block) ...
BLOCK_SHARE = 0.15        # ... or this share of the input bytes plus BLOCK_BYTES, up to 1 GiB
CHUNK_BYTES = 8 << 20     # column chunks of a row block: wide enough for BLAS, near the cache
EXTENDED_COPIES = 12      # (R, V) arrays `semantic_rows` holds at once: it runs on sub-blocks
EXTENDED_HELD = 4         # (R, V) arrays an extended row block keeps: logits, G, phi, |G|
VOCAB_BYTES = 32 << 20    # rows of W converted to float64 at a time
LAYOUTS = ("VH", "HV")
# the loss's floor keeps float32's logit bound, whatever your gradients' precision
LOSS_LOGIT_TERMS = (0.0, 1.0)


@dataclass(frozen=True)
class RowBlock:
    """Rows [start, stop): float64 hidden states, logits (R, V), the normaliser and row losses."""

    start: int
    stop: int
    h: np.ndarray
    z: np.ndarray
    lse: np.ndarray
    loss: np.ndarray
    ev: ChunkEval | None = None   # extended semantics: the softmax model's rows ...
    phi: np.ndarray | None = None  # ... and the gradient's floor (see `LinearCE.evaluate`)

    @property
    def rows(self) -> np.ndarray:
        return np.arange(self.start, self.stop)


@dataclass(frozen=True)
class LinearCE:
    """A validated fused-linear problem; `weight` is always a (V, H) view (a transposed view
    for `weight_layout=HV`)."""

    hidden: np.ndarray            # (N, H) user dtype, maybe memory-mapped
    weight: np.ndarray            # (V, H) view
    bias: np.ndarray | None       # (V,) float64
    labels: np.ndarray            # (N,) int64
    valid: np.ndarray             # (N,) rows that contribute
    class_weight: np.ndarray | None
    smoothing: float
    reduction: str
    denominator: float
    batch_shape: tuple[int, ...]
    ignore_index: int = -100
    w_norm_max: float = 0.0       # max_v |W_v|_2 + max |b|: scales the logits' rounding
    w_norms: np.ndarray | None = None  # (V,) |W_v|_2
    block_bytes: int = BLOCK_BYTES
    sm: Any = None                # the softmax model of the logits (models/softmax.py SoftmaxCE):
    #                               targets, denominator, the training-code semantics
    lse_weight: float = 1.0       # the gradient floor's |lse| weight (`with_floor`)
    logit_terms: tuple[float, float] = (0.0, 1.0)  # `logit_error`'s weights (`with_floor`)
    loss16: bool = False          # your gradients are 16-bit: `loss_floor(block, herr)` too

    @property
    def n_rows(self) -> int:
        return self.hidden.shape[0]

    @property
    def n_classes(self) -> int:
        return self.weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.hidden.shape[1]

    @property
    def grad_scale(self) -> float:
        return float(self.sm.grad_scale)

    def reduce(self, total: float) -> float:
        return float(self.sm.reduce(total))

    @property
    def extended(self) -> bool:
        """z-loss, softcap, logit scale or sample weights: rows go through the softmax model's
        `semantic_rows` (the streaming pass's fast path covers the rest)."""
        return bool(self.sm.sem.extended)

    def batch_index(self, row: int) -> tuple[int, ...]:
        return tuple(int(i) for i in np.unravel_index(row, self.batch_shape))

    def weight_block(self, v0: int, v1: int) -> np.ndarray:
        return np.ascontiguousarray(self.weight[v0:v1], dtype=np.float64)

    def hidden_rows(self, rows: np.ndarray | slice) -> np.ndarray:
        return np.asarray(self.hidden[rows], dtype=np.float64)

    def vocab_blocks(self, step: int | None = None):
        step = step or max(256, VOCAB_BYTES // (8 * max(1, self.hidden_size)))
        for v0 in range(0, self.n_classes, step):
            yield v0, min(self.n_classes, v0 + step)

    def row_step(self) -> int:
        per_row = 8 * max(1, self.n_classes) * (EXTENDED_HELD if self.extended else 1)
        return max(1, min(self.n_rows, self.block_bytes // per_row))

    def semantic_step(self) -> int:
        """Rows the softmax model's `semantic_rows` evaluates at once: its EXTENDED_COPIES (R, V)
        temporaries within a quarter of the row block's bytes (the other three hold the logits,
        G and phi meanwhile), so that the peak stays at `block_bytes`."""
        return max(1, self.block_bytes // (8 * max(1, self.n_classes) * EXTENDED_COPIES * EXTENDED_HELD))

    def with_budget(self, input_bytes: int) -> LinearCE:
        """Row blocks of BLOCK_SHARE * input_bytes + BLOCK_BYTES (at most 1 GiB): fewer passes
        over W for large inputs while the peak stays near the inputs."""
        return replace(self, block_bytes=int(min(1 << 30, BLOCK_SHARE * input_bytes + BLOCK_BYTES)))

    def with_floor(self, lse_weight: float, logit_terms: tuple[float, float],
                   loss16: bool) -> LinearCE:
        """The gradient floor's |lse| weight, `logit_error`'s weights and `loss16` (verify/
        linear's `floor_terms`: one floor serves dL/dH, dL/dW and dL/db)."""
        return replace(self, lse_weight=lse_weight, logit_terms=logit_terms, loss16=loss16)

    def col_chunks(self, rows: int):
        """Column ranges of a (rows x V) block of about CHUNK_BYTES: cache-sized pieces."""
        step = max(16, CHUNK_BYTES // (8 * max(1, rows)))
        for v0 in range(0, self.n_classes, step):
            yield v0, min(self.n_classes, v0 + step)

    def logits(self, h: np.ndarray, v0: int, v1: int, w: np.ndarray | None = None) -> np.ndarray:
        """z = h W[v0:v1]^T + b[v0:v1] in float64."""
        z = h @ (self.weight_block(v0, v1) if w is None else w).T
        if self.bias is not None:
            z += self.bias[v0:v1]
        return z

    def targets(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(alpha, beta, y): q = alpha e_y + beta w, zero for ignored rows (the softmax model's:
        `smoothing_form` included)."""
        return self.sm.targets(rows)  # type: ignore[no-any-return]

    def total_weight(self, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
        """Q = sum_v q_v = alpha + beta * sum(w)."""
        wsum = float(self.class_weight.sum()) if self.class_weight is not None else float(self.n_classes)
        return alpha + beta * wsum

    def forward_block(self, start: int, stop: int,
                      on_vocab: Callable[[int, int, np.ndarray], None] | None = None) -> RowBlock:
        """Rows [start, stop): the float64 logits one vocabulary block at a time (W converted
        block by block; `on_vocab(v0, v1, w64)` sees each converted block), then
        lse = m + log sum exp(z - m) in column chunks, and the losses."""
        h = self.hidden_rows(slice(start, stop))
        z = np.empty((h.shape[0], self.n_classes))
        for v0, v1 in self.vocab_blocks():
            zb = z[:, v0:v1]
            w = self.weight_block(v0, v1)
            np.matmul(h, w.T, out=zb)
            if self.bias is not None:
                zb += self.bias[v0:v1]
            if on_vocab is not None:
                on_vocab(v0, v1, w)
        rows = np.arange(start, stop)
        if self.extended:
            ev, phi = self.evaluate(z, rows, self.logit_error(h, z))
            return RowBlock(start, stop, h, z, ev.lse, ev.loss, ev, phi)
        lse = row_lse(z)
        return RowBlock(start, stop, h, z, lse, self.row_loss(z, lse, rows))

    def evaluate(self, x: np.ndarray, rows: np.ndarray, herr: np.ndarray
                 ) -> tuple[ChunkEval, np.ndarray]:
        """`evaluate_part` over sub-blocks of `semantic_step` rows, written into one G and phi
        (the per-row values joined; the softmax model's own floor is folded into phi)."""
        step = self.semantic_step()
        if x.shape[0] <= step:
            return self.evaluate_part(x, rows, herr)
        grad, phi = np.empty(x.shape), np.empty(x.shape)
        parts = []
        for i in range(0, x.shape[0], step):
            ev, phi[i:i + step] = self.evaluate_part(x[i:i + step], rows[i:i + step], herr[i:i + step])
            grad[i:i + step] = ev.grad
            parts.append(replace(ev, grad=None, floor=None))
        joined: dict[str, Any] = {f: np.concatenate([getattr(p, f) for p in parts])
                  for f in ("loss", "lse", "total_weight", "row_max", "log1p_s1", "row_terms")
                  if getattr(parts[0], f) is not None}
        return replace(parts[0], grad=grad, **joined), phi

    def evaluate_part(self, x: np.ndarray, rows: np.ndarray, herr: np.ndarray
                      ) -> tuple[ChunkEval, np.ndarray]:
        """Extended semantics on raw logits x (R, V): the softmax model's rows (loss, lse, the
        reduced gradient w.r.t. x) and the gradient's floor in units of k*eps, plus the logits'
        own rounding, which moves z = T(x) by |T'| herr and a by a |T'| 2 herr."""
        ev = self.sm.evaluate_rows(x, rows, grad=True, floor_coef=1.0, lse_weight=self.lse_weight)
        sem = self.sm.sem
        z, dz = transform(x, sem.logit_scale, sem.softcap)
        a = np.exp(z - ev.lse[:, None])
        a *= (2.0 * herr * np.abs(ev.total_weight) * abs(self.grad_scale))[:, None]
        a *= np.abs(dz)
        a += ev.floor
        return replace(ev, floor=None), a

    def row_loss(self, z: np.ndarray, lse: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """loss_n = Q lse - alpha z_y - beta w.z (0 for ignored rows), from full logit rows."""
        alpha, beta, ys = self.targets(rows)
        zy = z[np.arange(z.shape[0]), ys]
        loss = self.total_weight(alpha, beta) * lse - np.where(alpha != 0, alpha * zy, 0.0)
        if self.smoothing:
            wz = z @ self.class_weight if self.class_weight is not None else z.sum(axis=1)
            loss -= beta * wz
        return np.where(self.valid[rows], loss, 0.0)

    def logit_error(self, h: np.ndarray, z: np.ndarray,
                    terms: tuple[float, float] | None = None) -> np.ndarray:
        """Per row, how far a correct kernel's logits z_n = h_n W^T (+ b) may be off, in units of
        eps, `terms` (default `logit_terms`) = (rounding, accumulation) weighing max_v |z_nv|
        and |h_n|_2 max|W_v|_2: (0, 1) for float32, (1/2, 2^-24 / eps) for a computation in
        16 bits (rounded to it once, accumulated in float32)."""
        rounding, accumulation = terms or self.logit_terms
        err = np.sqrt(np.einsum("ij,ij->i", h, h)) * (self.w_norm_max * accumulation)
        if rounding and z.size:
            err += rounding * np.abs(z).max(axis=1)
        return err

    def grad_terms(self, z: np.ndarray, rows: np.ndarray, cols: np.ndarray, lse: np.ndarray,
                   herr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """G = s (Q a - q) of logits z (rows x sorted vocabulary `cols`) and its floor phi in
        units of k*eps (`herr` = `logit_error` of the rows):

            phi = s (Q a (1 + |log a| + lam |lse| + 2 herr) + |q|)    (lam: `lse_weight`)

        (the softmax CE floor, plus the logits' own rounding, which moves a by a * 2 dz)."""
        alpha, beta, ys = self.targets(rows)
        Q = self.total_weight(alpha, beta)
        scale = self.grad_scale
        with np.errstate(invalid="ignore"):
            loga = z - lse[:, None]
            a = np.exp(loga)
        phi = np.abs(loga)
        phi += (1.0 + self.lse_weight * np.abs(lse) + 2.0 * herr)[:, None]
        phi *= a
        phi *= (scale * np.abs(Q))[:, None]
        g = a
        g *= (scale * Q)[:, None]
        pos = np.minimum(np.searchsorted(cols, ys), max(0, cols.size - 1))
        local = np.flatnonzero((cols.size > 0) & (cols[pos] == ys) & (alpha != 0))
        g[local, pos[local]] -= scale * alpha[local]
        phi[local, pos[local]] += scale * np.abs(alpha[local])
        if self.smoothing:
            w = self.class_weight[cols] if self.class_weight is not None else 1.0
            g -= (scale * beta)[:, None] * w
            phi += (scale * np.abs(beta))[:, None] * np.abs(w)
        return g, phi

    def full_terms(self, rows: np.ndarray | slice, herr: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Extended semantics: (h, G, phi) of whole rows `rows` (`herr` of every row)."""
        h = self.hidden_rows(rows)
        z = np.empty((h.shape[0], self.n_classes))
        for v0, v1 in self.vocab_blocks():
            z[:, v0:v1] = self.logits(h, v0, v1)
        idx = np.arange(self.n_rows)[rows]
        ev, phi = self.evaluate(z, idx, herr[idx])
        return h, np.asarray(ev.grad), phi

    def row_probe(self, z: np.ndarray, row: np.ndarray, dz: np.ndarray, lse: np.ndarray,
                  herr: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, float]:
        """Row `row` (logits z (1, V)) moved by +-dz: scale * (loss(+) - loss(-)), the row's G and
        floor phi (V,), and a bound of |difference - G . 2 dz|: the Taylor remainder and the
        rounding of both evaluations (the softmax model's bound with extended semantics)."""
        scale, delta = self.grad_scale, 2.0 * dz
        if self.extended:
            ep = self.sm.evaluate_rows(z + dz, row, grad=False)
            em = self.sm.evaluate_rows(z - dz, row, grad=False)
            ev, phi = self.evaluate(z, row, herr)
            bound = float(self.sm.directional_error_bound(ep, em, delta[None, :])[0])
            return scale * float(ep.loss[0] - em.loss[0]), np.asarray(ev.grad)[0], phi[0], bound
        zp, zm = z + dz, z - dz
        lp = float(self.row_loss(zp, row_lse(zp), row)[0])
        lm = float(self.row_loss(zm, row_lse(zm), row)[0])
        g, phi = self.grad_terms(z.copy(), row, np.arange(self.n_classes), lse, herr)
        Q = abs(float(self.total_weight(*self.targets(row)[:2])[0]))
        reach = float(np.abs(delta).max(initial=0.0))
        rounding = 16.0 * EPS * (max(abs(lp), abs(lm)) + Q * (2 + 2 * math.log2(max(2, self.n_classes))))
        return scale * (lp - lm), g[0], phi[0], scale * (rounding + Q * THIRD_MOMENT_MAX * reach**3 / 3.0)

    def column_probe(self, blk: RowBlock, cols: np.ndarray, d: np.ndarray, herr: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Logit column cols[i] of every row moved by +-d[:, i] (R, K): per row and probe
        scale * (loss(+) - loss(-)), a bound of its distance from G . 2d, and G, phi there.
        lse moves by log1p(a expm1(dz)) exactly, dz the move of the (transformed) logit."""
        rows, scale = blk.rows, self.grad_scale
        alpha, beta, ys = self.targets(rows)
        Q = self.total_weight(alpha, beta)[:, None]
        cw = self.class_weight[cols] if self.class_weight is not None else 1.0
        q = np.where(ys[:, None] == cols[None, :], alpha[:, None], 0.0) + beta[:, None] * cw
        if blk.ev is not None:
            return self._column_probe_extended(blk, cols, d, q)
        ucols, inv = np.unique(cols, return_inverse=True)
        g, phi = self.grad_terms(blk.z[:, ucols], rows, ucols, blk.lse, herr)
        loga = blk.z[:, cols] - blk.lse[:, None]
        a = np.exp(loga)
        lp, lm = np.log1p(a * np.expm1(d)), np.log1p(a * np.expm1(-d))
        Qa = np.abs(Q)
        err = (4.0 * EPS * Qa * (np.abs(lp) + np.abs(lm)) + Qa * THIRD_MOMENT_MAX * np.abs(2.0 * d)**3 / 3.0
               + 2.0 * EPS * (2.0 + np.abs(loga) + np.abs(blk.lse)[:, None]) * Qa * a * 2.0 * np.abs(d))
        return scale * (Q * (lp - lm) - q * 2.0 * d), scale * err, g[:, inv], phi[:, inv]

    def _column_probe_extended(self, blk: RowBlock, cols: np.ndarray, d: np.ndarray, q: np.ndarray
                               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """`column_probe` through T (softcap, scale), the sample weight s and the z-loss:
        loss = s (Q L - q . z + zeta v L^2) with L = lse + log1p(a expm1(T(x + d) - T(x)));
        the bound is the softmax model's one-coordinate bound (semantics.fd_error_bound) at h = |d|."""
        ev, sem, scale = blk.ev, self.sm.sem, self.grad_scale
        assert ev is not None and blk.phi is not None
        rows = blk.rows
        x = blk.z[:, cols]
        z0, _ = transform(x, sem.logit_scale, sem.softcap)
        zp, _ = transform(x + d, sem.logit_scale, sem.softcap)
        zm, _ = transform(x - d, sem.logit_scale, sem.softcap)
        a = np.exp(z0 - ev.lse[:, None])
        lp, lm = np.log1p(a * np.expm1(zp - z0)), np.log1p(a * np.expm1(zm - z0))
        s = sem.row_weight(rows)[:, None]
        Q = np.asarray(ev.row_terms)[:, 1:2]   # the target weights' sum (before the z-loss)
        L = ev.lse[:, None]
        v = self.valid[rows][:, None].astype(np.float64)
        diff = s * (Q * (lp - lm) - q * (zp - zm) + sem.z_loss * v * (lp - lm) * (2.0 * L + lp + lm))
        err = np.empty_like(d)
        for i in range(cols.size):
            h = np.maximum(np.abs(d[:, i]), np.finfo(np.float64).tiny)
            err[:, i] = 2.0 * h * fd_error_bound(sem, self.n_classes, x[:, i], h, ev)
        g = np.asarray(ev.grad)[:, cols]
        return scale * diff, scale * err, g, blk.phi[:, cols]

    def loss_floor(self, block: RowBlock, herr: np.ndarray | None = None) -> np.ndarray:
        """Per-row loss error of a correct kernel in units of k*eps: with float32's logit
        bound, or, given the rows' `herr` (`logit_error` with `logit_terms`, as the gradient's
        floor has it), as the per-sample losses of a 16-bit computation (LossStage's second
        rule: each loss rounded to 16 bits once, `softmax_unit16`'s |loss_n| + Q_n log V)."""
        sixteen = herr is not None
        reach = 2.0 * (herr if herr is not None
                       else self.logit_error(block.h, block.z, LOSS_LOGIT_TERMS))
        if block.ev is not None:
            s, _Q, _qabs, qsum, _zabs = np.abs(np.asarray(block.ev.row_terms)).T
            Q = np.abs(block.ev.total_weight)
            floor = self.sm.loss_floor(block.ev, 1.0) + reach * abs(self.sm.sem.logit_scale) * (Q + s * qsum)
        else:
            alpha, beta, _ = self.targets(block.rows)
            Q = np.abs(self.total_weight(alpha, beta))
            floor = np.abs(block.loss) + Q * (1.0 + np.abs(block.lse) + reach)
        if sixteen:
            floor = floor + np.abs(block.loss) + Q * math.log(self.n_classes)
        return np.asarray(floor) * self.grad_scale


def row_lse(z: np.ndarray) -> np.ndarray:
    """log sum_v exp z_v of every row: m = max, then sum exp(z - m) over column chunks."""
    m = z.max(axis=1) if z.shape[1] else np.zeros(z.shape[0])
    total = np.zeros(z.shape[0])
    step = max(16, CHUNK_BYTES // (8 * max(1, z.shape[0])))
    buf = np.empty((z.shape[0], min(step, z.shape[1])))
    for v0 in range(0, z.shape[1], step):
        t = buf[:, :min(step, z.shape[1] - v0)]
        np.subtract(z[:, v0:v0 + step], m[:, None], out=t)
        np.exp(t, out=t)
        total += t.sum(axis=1)
    return m + np.log(total)


def build_linear_ce(hidden, weight, labels, *, bias=None, class_weight=None, reduction: str = "mean",
                    ignore_index: int = -100, label_smoothing: float = 0.0,
                    weight_layout: str = "VH", sources: dict[str, str] | None = None,
                    semantics: Semantics | None = None) -> tuple[LinearCE, list[str]]:
    """Validate the arrays and build the problem; returns it with warnings. The targets, the
    denominator and the training-code `semantics` are the softmax model's (models/softmax.py),
    built over the logits' shape without the logits (a zero-stride placeholder)."""
    src = {"hidden": "hidden", "weight": "weight", "labels": "labels", "bias": "bias",
           "class_weight": "class_weight", "sample_weight": "sample_weight", **(sources or {})}
    h, w, y = (np.asarray(a) if not isinstance(a, np.ndarray) else a for a in (hidden, weight, labels))
    for role, arr in (("hidden", h), ("weight", w)):
        if arr.dtype.kind not in "iuf" and arr.dtype.name != "bfloat16":
            raise CeCheckError(f"{src[role]}: dtype {arr.dtype} is not floating point")
    if reduction not in REDUCTIONS:
        raise CeCheckError(f"`reduction`: unknown value '{reduction}' (use mean, sum or none)")
    if not (np.isfinite(label_smoothing) and 0.0 <= label_smoothing <= 1.0):
        raise CeCheckError(f"`label_smoothing`: must be in [0, 1], got {label_smoothing}")
    if h.ndim not in (2, 3):
        raise CeCheckError(f"{src['hidden']}: shape {h.shape}; expected (N, H) or (B, T, H)")
    batch_shape, H = tuple(h.shape[:-1]), h.shape[-1]
    w_vh = _weight_view(w, H, weight_layout, src["weight"], src["hidden"])
    V = w_vh.shape[0]
    rows_h = h.reshape(-1, H)
    ys = _labels(y, batch_shape, V, ignore_index, src["labels"])
    b64 = _vector(bias, V, src["bias"], "bias")
    cw = _vector(class_weight, V, src["class_weight"], "class weights")
    if semantics is not None and semantics.sample_weight is not None:
        semantics = replace(semantics, sample_weight=_per_token(
            semantics.sample_weight, batch_shape, src["sample_weight"]))
    placeholder = np.broadcast_to(np.zeros((), dtype=np.float32), batch_shape + (V,))
    sm, warnings = build_softmax_ce(
        placeholder, ys.reshape(batch_shape), weight=cw, reduction=reduction,
        ignore_index=ignore_index, label_smoothing=label_smoothing, source=src["hidden"],
        labels_source=src["labels"], weight_source=src["class_weight"], semantics=semantics,
        sample_weight_source=src["sample_weight"])
    _check_finite(rows_h, src["hidden"], batch_shape)
    norms = _row_norms(w_vh, src["weight"])
    w_max = float(norms.max(initial=0.0)) + (float(np.abs(b64).max()) if b64 is not None else 0.0)
    return LinearCE(rows_h, w_vh, b64, ys, sm.valid, cw, float(label_smoothing), reduction,
                    sm.denominator, batch_shape, ignore_index, w_max, norms, sm=sm), warnings


def _weight_view(w: np.ndarray, H: int, layout: str, source: str, hidden_source: str) -> np.ndarray:
    if layout not in LAYOUTS:
        raise CeCheckError(f"`weight_layout`: unknown value '{layout}' (use VH or HV)")
    if w.ndim != 2:
        raise CeCheckError(f"{source}: shape {w.shape}; expected a matrix (V, H)")
    view = w if layout == "VH" else w.T
    if view.shape[1] == H:
        return view
    if view.shape[0] == H:
        other = "HV" if layout == "VH" else "VH"
        raise CeCheckError(f"{source}: shape {w.shape} fits the hidden size H={H} only transposed; "
                           f"pass `weight_layout={other}`")
    expected = "(V, H)" if layout == "VH" else "(H, V)"
    raise CeCheckError(f"{source}: shape {w.shape} does not match the hidden size H={H} of "
                       f"{hidden_source}; expected {expected} with H={H}")


def _labels(y: np.ndarray, batch_shape: tuple[int, ...], V: int, ignore_index: int,
            source: str) -> np.ndarray:
    if y.dtype.kind not in "iu" and not (y.dtype.kind == "f" and np.all(y == np.round(y))):
        raise CeCheckError(f"{source}: dtype {y.dtype}: class indices must be integers")
    N = int(np.prod(batch_shape))
    if y.shape != batch_shape and y.shape != (N,):
        raise CeCheckError(f"{source}: shape {y.shape} but the hidden states hold {N} tokens "
                           f"{batch_shape}; expected {batch_shape}")
    ys = np.asarray(y, dtype=np.int64).reshape(-1)
    bad = (ys != ignore_index) & ((ys < 0) | (ys >= V))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        where = tuple(int(k) for k in np.unravel_index(i, batch_shape))
        raise CeCheckError(f"{source}: shape {y.shape}: label {int(ys[i])} at index {where} is out "
                           f"of range [0, {V}) and is not the ignore_index {ignore_index}")
    return ys


def _per_token(arr, batch_shape: tuple[int, ...], source: str) -> np.ndarray:
    """One value per token: the tokens' shape, or flattened."""
    a = np.asarray(arr)
    N = int(np.prod(batch_shape))
    if a.shape != batch_shape and a.shape != (N,):
        raise CeCheckError(f"{source}: shape {a.shape} but the hidden states hold {N} tokens "
                           f"{batch_shape}; expected {batch_shape}")
    return a.reshape(batch_shape)


def _vector(arr, V: int, source: str, what: str) -> np.ndarray | None:
    if arr is None:
        return None
    v = np.asarray(arr, dtype=np.float64)
    if v.shape != (V,):
        raise CeCheckError(f"{source}: shape {v.shape} but the weight has V={V} rows; "
                           f"expected {what} of shape ({V},)")
    if not np.all(np.isfinite(v)):
        i = int(np.flatnonzero(~np.isfinite(v))[0])
        raise CeCheckError(f"{source}: shape ({V},): non-finite value {v[i]} at index ({i},)")
    return v


def _check_finite(rows: np.ndarray, source: str, batch_shape: tuple[int, ...]) -> None:
    step = max(1, (1 << 22) // max(1, rows.shape[1]))
    for r0 in range(0, rows.shape[0], step):
        block = np.asarray(rows[r0:r0 + step], dtype=np.float64)
        if not np.isfinite(block).all():
            r, c = (int(v) for v in np.argwhere(~np.isfinite(block))[0])
            where = np.unravel_index(r0 + r, batch_shape) + (c,)
            raise CeCheckError(f"{source}: non-finite value {block[r, c]} at index "
                               f"{tuple(int(i) for i in where)}")


def _row_norms(w: np.ndarray, source: str) -> np.ndarray:
    """|W_v|_2 of every vocabulary row; a non-finite weight is an input error."""
    out = np.empty(w.shape[0])
    step = max(256, VOCAB_BYTES // (8 * max(1, w.shape[1])))
    for v0 in range(0, w.shape[0], step):
        block = np.asarray(w[v0:v0 + step], dtype=np.float64)
        norms = np.einsum("ij,ij->i", block, block)
        if not np.isfinite(norms).all():
            r = int(np.flatnonzero(~np.isfinite(norms))[0])
            raise CeCheckError(f"{source}: non-finite value in weight row {v0 + r}")
        out[v0:v0 + step] = np.sqrt(norms)
    return out
