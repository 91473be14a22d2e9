"""Structured bases W0.

* `XorCirculantBase` — the original's base (spec-builder-runtime §2): per block an XOR-circulant
  matrix F_b[p, j] = h2_b[p XOR j] after a gather permutation, stored as the Hadamard chain
  D3·H·P2·D2·H·P1·D1 with d2 = H·h2/L. This is the only base written to GGUF.
* `LowRankBase` (rank-r truncated SVD) and `CirculantBase` (cyclic, applied by FFT) — for
  harness A only, so the user's A3/A4 plan can be run as written.

Every base is described by its *stored* arrays: dense/apply use the rounded values.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

import numpy as np

from seeddelta.codec.hadamard import fwht, fwht_sequential, fwht_sequential_at, is_pow2, next_pow2
from seeddelta.codec.storage import val_dtype


class Base(Protocol):
    kind: str
    n_in: int
    n_out: int

    def dense_rows(self, rows: np.ndarray) -> np.ndarray: ...
    def apply(self, x: np.ndarray) -> np.ndarray: ...
    def tensors(self) -> dict[str, np.ndarray]: ...
    def ops(self) -> int: ...


@dataclass(frozen=True)
class Geometry:
    """L = next_pow2(min(n_in, n_out)), B = ceil(max(n_in, n_out) / L); tall iff n_out >= n_in."""

    n_in: int
    n_out: int

    @property
    def L(self) -> int:  # noqa: N802 - the spec's name
        return next_pow2(min(self.n_in, self.n_out))

    @property
    def B(self) -> int:  # noqa: N802
        return -(-max(self.n_in, self.n_out) // self.L)

    @property
    def tall(self) -> bool:
        return self.n_out >= self.n_in


def _safe_gather_index(perm: np.ndarray, length: int) -> np.ndarray:
    """The runtime reads element 0 for an out-of-range permutation entry."""
    perm = perm.astype(np.int64)
    return np.where((perm >= 0) & (perm < length), perm, 0)


@dataclass
class XorCirculantBase:
    n_in: int
    n_out: int
    d1: np.ndarray  # (B, L) stored float type
    d2: np.ndarray | None  # (B, L); None: depth-1 chain D3·H·P1·D1 (runtime §2.2 step 4)
    d3: np.ndarray  # (B, L)
    perm1: np.ndarray  # (B, L) int16 | int32, gather semantics
    perm2: np.ndarray | None = None
    # weighted within-bucket SSE of the fit (information; `sse`): a number, or how to compute it when asked
    # (one permutation trial: from the weight it was fitted on, while that array lives; NaN after)
    fit_sse: float | Callable[[], float] = field(default=0.0, compare=False, repr=False)
    kind: str = "xor_circulant"

    @property
    def sse(self) -> float:
        if callable(self.fit_sse):
            self.fit_sse = float(self.fit_sse())
        return self.fit_sse

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.n_in, self.n_out)

    @cached_property
    def _closed_form(self) -> bool:
        """True when F_b[p, j] = h2_b[p XOR inv_b[j]] holds (d1 = d3 = 1, no P2, P1 a permutation)."""
        L = self.d1.shape[1]
        if self.d2 is None or self.perm2 is not None or np.any(self.d1 != 1) or np.any(self.d3 != 1):
            return False
        return bool(np.all(np.sort(self.perm1.astype(np.int64), axis=1) == np.arange(L)[None, :]))

    @cached_property
    def _shared_first_stage(self) -> bool:
        """Every block has the same D1 and P1 (always for one permutation trial)."""
        return bool(np.all(self.d1 == self.d1[:1]) and np.all(self.perm1 == self.perm1[:1]))

    @cached_property
    def _plain_first_stage(self) -> bool:
        """D1 all ones and P1 the identity in every block (the builder's fit with one permutation trial)."""
        L = self.d1.shape[1]
        return bool(np.all(self.d1 == 1) and np.all(self.perm1 == np.arange(L)[None, :]))

    @cached_property
    def h2(self) -> np.ndarray:
        """Effective XOR kernel of the stored d2 in float64: h2 = H·d2 (exact for the stored values)."""
        assert self.d2 is not None
        return fwht(self.d2.astype(np.float64))

    @cached_property
    def inv_perm1(self) -> np.ndarray:
        B, L = self.perm1.shape
        inv = np.empty((B, L), dtype=np.int64)
        inv[np.arange(B)[:, None], self.perm1.astype(np.int64)] = np.arange(L)[None, :]
        return inv

    @cached_property
    def _piece_table(self) -> tuple[int, np.ndarray] | None:
        """(C, table) when W0 can be cut from contiguous pieces (closed form, P1 the identity, C a power
        of two ≥ 8 dividing n_in): with p = hi·C + lo and j = g·C + c, h2_b[p XOR j] is
        h2_b[(hi XOR g)·C + (c XOR lo)], so row p's columns g·C … g·C + C − 1 are row
        (b·C + lo)·(L/C) + (hi XOR g) of table[b, lo, h, c] = h2_b[h·C + (c XOR lo)]: a row gathers
        n_in/C pieces of C values instead of n_in single values, the same values. None otherwise."""
        L = self.geometry.L
        piece = min(L, 32, self.n_in & -self.n_in)  # the largest power of two dividing n_in, at most 32
        if piece < 8 or not self._closed_form or np.any(self.perm1 != np.arange(L)[None, :]):
            return None
        kernel = self.h2.reshape(-1, L // piece, piece)  # [b, h, c]
        xor = np.arange(piece)[:, None] ^ np.arange(piece)[None, :]  # [lo, c] -> c XOR lo
        table = np.ascontiguousarray(kernel[:, :, xor].transpose(0, 2, 1, 3))  # [b, lo, h, c]
        return piece, table.reshape(-1, piece)

    def _dense_rows_pieces(self, rows: np.ndarray, piece: int, table: np.ndarray) -> np.ndarray:
        L, n_in = self.geometry.L, self.n_in
        per_block = L // piece
        g = np.arange(n_in // piece)
        if self.geometry.tall:  # row r = b·L + p, every column in block b
            b, p = rows // L, rows % L
            index = ((b * piece + p % piece) * per_block)[:, None] + ((p // piece)[:, None] ^ g[None, :])
        else:  # column chunk g lies in block g // per_block, at chunk g % per_block of it; row r < L
            col_block, q = g // per_block, g % per_block
            index = (col_block[None, :] * piece + (rows % piece)[:, None]) * per_block + ((rows // piece)[:, None] ^ q)
        return np.take(table, index, axis=0).reshape(len(rows), n_in)

    def dense_rows(self, rows: np.ndarray) -> np.ndarray:
        """W0[rows, :] in float64 from the stored arrays."""
        rows = np.asarray(rows, dtype=np.int64)
        if not self._closed_form:
            return self._chain(np.eye(self.n_in, dtype=np.float64))[:, rows].T
        pieces = self._piece_table
        if pieces is not None:
            return self._dense_rows_pieces(rows, *pieces)
        L, n_in = self.geometry.L, self.n_in
        kernel = self.h2.reshape(-1)  # block b's kernel at [b·L, (b+1)·L)
        inv = self.inv_perm1.astype(np.intp)
        if self.geometry.tall:  # row r = b·L + p: W0[r, j] = h2_b[p XOR inv_b[j]]
            blocks, p = rows // L, rows % L
            out = np.empty((len(rows), n_in))
            for b in np.unique(blocks):
                sel = np.nonzero(blocks == b)[0]
                index = p[sel, None] ^ inv[b, None, :n_in]
                if sel[-1] - sel[0] + 1 == sel.size:  # a range of rows (the encoder's chunks): gathered in place (XOR of
                    # two values below L is below L: "clip" never clips, and unlike "raise" it needs no buffer)
                    np.take(kernel[b * L : (b + 1) * L], index, out=out[sel[0] : sel[-1] + 1], mode="clip")
                else:
                    out[sel] = kernel[b * L : (b + 1) * L][index]
            return out
        # wide: column j = b·L + q of block b: W0[r, j] = h2_b[r XOR inv_b[q]]
        col_inv = inv.reshape(-1)[:n_in]
        col_base = (np.arange(n_in) // L) * L
        return kernel[(rows.astype(np.intp)[:, None] ^ col_inv[None, :]) + col_base[None, :]]

    def _block_op(self, v: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
        """F_b for every block at once: v (..., B, L) -> (..., B, L), in v's dtype, runtime order.
        The transforms are `fwht_sequential` (torch's matrix-product arithmetic, in numpy: the
        builder measures what the runtime computes without importing torch). With `positions`
        (sorted, distinct), only those outputs of every block: (..., B, P), the same bits."""
        L = v.shape[-1]
        dtype = v.dtype.type

        def gather(t: np.ndarray, perm: np.ndarray) -> np.ndarray:
            index = np.broadcast_to(_safe_gather_index(perm, L), t.shape)
            return np.take_along_axis(t, index, axis=-1)

        if self._plain_first_stage:  # D1 = 1 and P1 the identity: v·1 gathered in order is v, bit for bit
            shape = v.shape
            v = np.broadcast_to(fwht_sequential(v[..., :1, :] if shape[-2] > 1 and v.strides[-2] == 0 else v), shape)
        elif self._shared_first_stage and v.shape[-2] > 1 and v.strides[-2] == 0:
            # the same input in every block (a tall base) and the same D1, P1: one block's first stage, shared
            first = fwht_sequential(gather(v[..., :1, :] * self.d1[:1].astype(dtype), self.perm1[:1]))
            v = np.broadcast_to(first, v.shape)
        else:
            v = gather(v * self.d1.astype(dtype), self.perm1)
            v = fwht_sequential(v)
        d3 = self.d3.astype(dtype) if positions is None else self.d3[:, positions].astype(dtype)
        if self.d2 is None and self.perm2 is None:
            return (v if positions is None else v[..., positions]) * d3
        if self.d2 is not None:
            v = v * self.d2.astype(dtype)
        if self.perm2 is not None:
            v = gather(v, self.perm2)
        return (fwht_sequential(v) if positions is None else fwht_sequential_at(v, positions)) * d3

    def _chain(self, x: np.ndarray) -> np.ndarray:
        """Runtime evaluation (spec §9.3): x (T, n_in) -> (T, n_out) in x's dtype."""
        g = self.geometry
        L, B = g.L, g.B
        T = x.shape[0]
        if g.tall:
            xh = np.zeros((T, 1, L), dtype=x.dtype)
            xh[:, 0, : self.n_in] = x
            out = self._block_op(np.broadcast_to(xh, (T, B, L)))
            return out.reshape(T, B * L)[:, : self.n_out]
        xb = np.zeros((T, B * L), dtype=x.dtype)
        xb[:, : self.n_in] = x
        blocks = self._block_op(xb.reshape(T, B, L))
        acc = blocks[:, 0, :].copy()
        for b in range(1, B):  # accumulation in block order, as the runtime does
            acc += blocks[:, b, :]
        return acc[:, : self.n_out]

    def apply(self, x: np.ndarray) -> np.ndarray:
        return self._chain(np.asarray(x, dtype=np.float32))

    def apply_rows(self, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """`apply(x)[:, rows]` bit for bit, computing the last transform at those outputs only."""
        x = np.asarray(x, dtype=np.float32)
        rows = np.asarray(rows, dtype=np.intp)
        g = self.geometry
        L, B = g.L, g.B
        T = x.shape[0]
        if g.tall:  # output r is block r // L's position r % L
            blocks, p = rows // L, rows % L
            positions = np.unique(p)
            xh = np.zeros((T, 1, L), dtype=x.dtype)
            xh[:, 0, : self.n_in] = x
            part = self._block_op(np.broadcast_to(xh, (T, B, L)), positions)
            return part[:, blocks, np.searchsorted(positions, p)]
        xb = np.zeros((T, B * L), dtype=x.dtype)  # wide: output r is the sum of every block's position r
        xb[:, : self.n_in] = x
        positions, where = np.unique(rows, return_inverse=True)
        part = self._block_op(xb.reshape(T, B, L), positions)
        acc = part[:, 0, :].copy()
        for b in range(1, B):  # accumulation in block order, as the runtime does
            acc += part[:, b, :]
        return acc[:, where]

    def tensors(self) -> dict[str, np.ndarray]:
        out = {"base_d1": self.d1}
        if self.d2 is not None:
            out["base_d2"] = self.d2
        out.update({"base_d3": self.d3, "base_perm1": self.perm1})
        if self.perm2 is not None:
            out["base_perm2"] = self.perm2
        return out

    def ops(self) -> int:
        g = self.geometry
        L = g.L
        return int(g.B * (2 * L * np.log2(max(2, L)) + 3 * L + (0 if g.tall else L)))


@functools.lru_cache(maxsize=16)
def _xor_counts(n_rows: int, n_cols: int, L: int) -> np.ndarray:
    """How many (p, j), p < n_rows, j < n_cols, have p XOR j = k, for every k < L (read-only)."""
    u = np.arange(n_rows)[:, None] ^ np.arange(n_cols)[None, :]
    counts = np.bincount(u.ravel(), minlength=L).astype(np.float64)
    counts.flags.writeable = False
    return counts


_FIT_CHUNK_VALUES = 1 << 16  # block values per bincount call: they and their buckets (8 + 8 bytes each) stay in a
# core's L2 cache instead of making several passes over a whole block (~4.7 MB each for SmolLM2's)


@dataclass(frozen=True)
class _BlockSample:
    """The values of one block and permutation trial: W[rows][:, cols], value (i, j) in bucket local[i] XOR
    slots[j]; `identity`: cols is one contiguous range (read as a slice, not gathered)."""

    rows: np.ndarray
    local: np.ndarray
    slots: np.ndarray
    cols: np.ndarray
    identity: bool


def _bucket_sums(W: np.ndarray, sample: _BlockSample, omega: np.ndarray | None, L: int, counts: bool,
                 with_sse: bool) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | None]:
    """Per bucket: Σω (None without `counts` and unit weights), Σω·v and Σω·v² (None without `with_sse`),
    the sums of one bincount over every value in row-major order, bit for bit, taken a chunk of rows
    at a time: each bincount call lists the running sums first (bucket k's at bucket k: 0 + s is s
    exactly, and a sum from +0 is never -0), then the chunk's values. Unit weights: ω·v is v exactly,
    and the counts are integers, added exactly."""
    rows, slots = sample.rows, sample.slots
    J = slots.size
    step = max(1, min(rows.size, _FIT_CHUNK_VALUES // max(1, J)))
    buckets = np.empty(L + step * J, dtype=np.intp)
    buckets[:L] = np.arange(L)
    vals = np.empty(L + step * J)
    products = np.empty_like(vals) if omega is not None or with_sse else None
    weights = None
    if omega is not None:  # every row's column weights: the same for every chunk
        weights = np.empty_like(vals)
        weights[L:].reshape(step, J)[...] = omega[None, :]

    def carried(buffer: np.ndarray, sums: np.ndarray, end: int) -> np.ndarray:
        buffer[:L] = sums
        return np.bincount(buckets[:end], weights=buffer[:end], minlength=L)

    s0 = None if omega is None and not counts else np.zeros(L)
    s1 = np.zeros(L)
    s2 = np.zeros(L) if with_sse else None
    lo, hi = (int(sample.cols[0]), int(sample.cols[-1]) + 1) if sample.identity and J else (0, 0)
    for start in range(0, rows.size, step):
        chunk = rows[start : start + step]
        end = L + chunk.size * J
        u = buckets[L:end].reshape(chunk.size, J)
        np.bitwise_xor(sample.local[start : start + step, None], slots[None, :], out=u)
        vals[L:end].reshape(chunk.size, J)[...] = W[chunk, lo:hi] if sample.identity else \
            W[chunk[:, None], sample.cols[None, :]]
        v = vals[L:end]
        if weights is None:  # unit weights: Σv, Σv·v and the integer counts
            if s0 is not None:
                s0 += np.bincount(u.ravel(), minlength=L)
            s1 = carried(vals, s1, end)
            wv = v
        else:
            assert products is not None and s0 is not None
            s0 = carried(weights, s0, end)
            wv = np.multiply(weights[L:end], v, out=products[L:end])
            s1 = carried(products, s1, end)
        if s2 is not None:
            assert products is not None
            np.multiply(wv, v, out=products[L:end])  # (wv's last use: it may be this buffer)
            s2 = carried(products, s2, end)
    return s0, s1, s2


def _bucket_fit(W: np.ndarray, sample: _BlockSample, omega: np.ndarray | None, L: int, full: bool = False,
                with_sse: bool = True) -> tuple[np.ndarray, float]:
    """Weighted mean per XOR bucket and the within-bucket SSE (NaN without `with_sse`: one pass of
    bincount fewer) of one block's sampled values (`_BlockSample`); omega: (J,) weight per value's column,
    None for unit weights. `full`: the buckets are (some order of p < S) XOR (j < J), so the unit-weight
    counts are `_xor_counts` (integers: the same whatever the order, and the same for every weight of
    that shape)."""
    s0, s1, s2 = _bucket_sums(W, sample, omega, L, counts=not full, with_sse=with_sse)
    if s0 is None:
        s0 = _xor_counts(sample.rows.size, sample.slots.size, L)
    h2 = np.divide(s1, s0, out=np.zeros(L), where=s0 > 0)
    if s2 is None:
        return h2, float("nan")
    sse = float(np.sum(np.maximum(s2 - np.divide(s1 * s1, s0, out=np.zeros(L), where=s0 > 0), 0.0)[s0 > 0]))
    return h2, sse


def fit_xor_circulant(
    W: np.ndarray,
    *,
    scale: np.ndarray | None,
    max_samples: int,
    perm_trials: int,
    rng: np.random.Generator,
    store: str = "f16",
) -> XorCirculantBase:
    """Least-squares XOR-circulant base per block (spec §2.4): identity permutation first, then
    seeded random ones; the smallest weighted SSE wins (ties keep the earlier trial)."""
    n_out, n_in = W.shape
    g = Geometry(n_in, n_out)
    L, B = g.L, g.B
    omega_all = np.ones(n_in) if scale is None else np.asarray(scale, dtype=np.float64) ** 2
    trials = max(1, int(perm_trials))
    h2 = np.zeros((B, L))
    perms = np.zeros((B, L), dtype=np.int64)
    total_sse = 0.0
    # one trial: no SSE decides anything, so it is computed only if asked (`XorCirculantBase.sse`), the
    # same sums over the same samples
    blocks: list[tuple[_BlockSample, bool]] = []
    shared_rows = np.zeros(0, dtype=np.int64)
    if not g.tall:
        candidates = rng.permutation(min(n_out, L))
        shared_rows = candidates if max_samples <= 0 else candidates[: max_samples]
    for b in range(B):
        if g.tall:
            n_local = min(n_out, (b + 1) * L) - b * L
            candidates = b * L + rng.permutation(n_local)
            rows = candidates if max_samples <= 0 else candidates[: max_samples]
            local = rows - b * L
            offset = 0
        else:
            rows = local = shared_rows
            n_local = min(n_out, L)
            offset = b * L
        best: tuple[float, np.ndarray, np.ndarray] | None = None
        for t in range(trials):
            perm = np.arange(L) if t == 0 else rng.permutation(L)
            src = offset + perm
            valid = src < (n_in if g.tall else min(n_in, (b + 1) * L))
            slots = np.nonzero(valid)[0]
            cols = src[slots]
            # every row of the block sampled and the identity trial's columns 0..J-1: counts known in advance
            full = t == 0 and local.size == n_local and bool(np.all(slots == np.arange(slots.size)))
            sample = _BlockSample(rows, local, slots, cols, t == 0)
            kernel, sse = _bucket_fit(W, sample, None if scale is None else omega_all[cols], L, full, with_sse=trials > 1)
            if trials == 1:
                blocks.append((sample, full))
            if best is None or sse < best[0]:
                best = (sse, kernel, perm)
        assert best is not None
        total_sse += best[0]
        h2[b], perms[b] = best[1], best[2]
    dtype = val_dtype(store)
    h2_32 = h2.astype(np.float32)
    d2 = (fwht(h2_32) * np.float32(1.0 / L)).astype(dtype)  # as the original: float32 transform, 1/L folded in
    ones = np.ones((B, L), dtype=dtype)
    perm_dtype = np.int16 if L <= 32768 else np.int32
    fit_sse: float | Callable[[], float] = total_sse
    if trials == 1:
        # W is held weakly: a fitted base must not keep its weight alive (the builder's trials wait
        # ahead of their decisions; at 7B scale a weight is ~235 MB). Freed, the SSE is NaN.
        weight = weakref.ref(W)

        def fit_sse() -> float:  # the blocks' SSE in block order, as a one-trial fit used to add them
            W = weight()
            if W is None:
                return float("nan")
            total = 0.0
            for sample, full in blocks:
                total += _bucket_fit(W, sample, None if scale is None else omega_all[sample.cols], L, full)[1]
            return total
    return XorCirculantBase(n_in, n_out, ones, d2, ones.copy(), perms.astype(perm_dtype), fit_sse=fit_sse)


@dataclass
class LowRankBase:
    """W0 = U·V with U (n_out, r) and V (r, n_in) stored in the value type (harness A only)."""

    n_in: int
    n_out: int
    u: np.ndarray
    v: np.ndarray
    kind: str = "lowrank"

    def dense_rows(self, rows: np.ndarray) -> np.ndarray:
        return self.u[np.asarray(rows)].astype(np.float64) @ self.v.astype(np.float64)

    def apply(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        return (x @ self.v.astype(np.float32).T) @ self.u.astype(np.float32).T

    def tensors(self) -> dict[str, np.ndarray]:
        return {"base_lr_u": self.u, "base_lr_v": self.v}

    def ops(self) -> int:
        return 2 * self.u.shape[1] * (self.n_in + self.n_out)


def fit_lowrank(W: np.ndarray, *, rank: int, scale: np.ndarray | None, store: str) -> LowRankBase:
    """Best rank-r approximation in the s-weighted Frobenius norm (Eckart–Young on W·diag(s))."""
    n_out, n_in = W.shape
    s = np.ones(n_in) if scale is None else np.asarray(scale, dtype=np.float64)
    u, sig, vt = np.linalg.svd(W.astype(np.float64) * s[None, :], full_matrices=False)
    r = min(rank, len(sig))
    dtype = val_dtype(store)
    return LowRankBase(n_in, n_out, (u[:, :r] * sig[:r]).astype(dtype), (vt[:r] / s[None, :]).astype(dtype))


@dataclass
class CirculantBase:
    """Cyclic W0[o, i] = c[(i − o) mod n_in] (rows repeat with period n_in), applied by FFT."""

    n_in: int
    n_out: int
    c: np.ndarray  # (n_in,) stored value type
    kind: str = "circulant"

    def dense_rows(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        cols = (np.arange(self.n_in)[None, :] - rows[:, None]) % self.n_in
        return self.c.astype(np.float64)[cols]

    def apply(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        # y[o] = Σ_j c[j]·x[(o + j) mod n]: a circular cross-correlation, conj(F c)·F x in Fourier space.
        spec = np.conj(np.fft.rfft(self.c.astype(np.float64))) * np.fft.rfft(x.astype(np.float64), axis=-1)
        full = np.fft.irfft(spec, n=self.n_in, axis=-1)
        return full[..., np.arange(self.n_out) % self.n_in].astype(np.float32)

    def tensors(self) -> dict[str, np.ndarray]:
        return {"base_circ_c": self.c}

    def ops(self) -> int:
        n = self.n_in
        return int(2 * 5 * n * np.log2(max(2, n)) + 6 * n)


def fit_circulant(W: np.ndarray, *, scale: np.ndarray | None, store: str) -> CirculantBase:
    """Weighted mean over each cyclic diagonal: the LS projection onto cyclic circulants."""
    n_out, n_in = W.shape
    omega = np.ones(n_in) if scale is None else np.asarray(scale, dtype=np.float64) ** 2
    o = np.arange(n_out)[:, None]
    i = np.arange(n_in)[None, :]
    diag = np.broadcast_to((i - o) % n_in, W.shape).ravel()
    w = np.broadcast_to(omega[None, :], W.shape).ravel()
    s0 = np.bincount(diag, weights=w, minlength=n_in)
    s1 = np.bincount(diag, weights=w * W.astype(np.float64).ravel(), minlength=n_in)
    c = np.divide(s1, s0, out=np.zeros(n_in), where=s0 > 0)
    return CirculantBase(n_in, n_out, c.astype(val_dtype(store)))


def xor_base_from_tensors(tensors: dict[str, np.ndarray], n_in: int, n_out: int) -> XorCirculantBase:
    d1 = tensors["base_d1"]
    L = d1.shape[-1]
    if not is_pow2(L):
        raise ValueError(f"base_d1 length {L} is not a power of two")
    d1 = d1.reshape(-1, L)

    def get(name: str, default: np.ndarray | None) -> np.ndarray | None:
        arr = tensors.get(name)
        return default if arr is None else arr.reshape(-1, L)

    ones = np.ones_like(d1)
    perm1 = get("base_perm1", np.broadcast_to(np.arange(L, dtype=np.int32), d1.shape).copy())
    d3 = get("base_d3", ones)
    assert perm1 is not None and d3 is not None
    return XorCirculantBase(n_in, n_out, d1, get("base_d2", None), d3, perm1, get("base_perm2", None))
