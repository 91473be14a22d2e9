"""The test oracle: SeedΔ decoded from its stored arrays by a third, independent path.

seeddelta has THREE independent SeedΔ decoders, on purpose, and they must stay independent:

1. the codec (`seeddelta.codec.encode.SeedDeltaWeight.dense/apply`) — what the builder measures;
2. the runtime (`seeddelta.runtime.projections`) — what inference computes, materialized or sparse;
3. this module — written from the file format's definition alone, in float64, with explicit
   Sylvester Hadamard matrices, explicit gathers and element loops (small matrices only), sharing
   no code with 1 or 2.

Tests compare 1 and 2 against 3. Merging any two of them into one would turn those tests into
comparisons of a function with itself: do not "deduplicate" this file away.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def sylvester_hadamard(L: int) -> np.ndarray:
    """H[i, j] = (-1)^popcount(i & j) as an explicit float64 matrix (natural order)."""
    H = np.ones((1, 1))
    while H.shape[0] < L:
        H = np.block([[H, H], [H, -H]])
    return H


def reference_base_chain(arrays: Mapping[str, np.ndarray], n_in: int, n_out: int) -> np.ndarray:
    """W0 (n_out, n_in) float64 from the runtime chain F_b = D3·H·P2·D2·H·P1·D1 (spec §2.2, §9.3)
    built as explicit matrices; out-of-range permutation entries gather element 0."""
    d1 = np.asarray(arrays["base_d1"], dtype=np.float64)
    B, L = d1.shape
    H = sylvester_hadamard(L)
    eye = np.eye(L)

    def gather(name: str) -> np.ndarray:
        p = np.asarray(arrays[name]).astype(np.int64)
        return eye[np.where((p >= 0) & (p < L), p, 0)]  # (P v)[i] = v[p[i]]

    blocks = []
    for b in range(B):
        F = np.diag(d1[b])
        if "base_perm1" in arrays:
            F = gather("base_perm1")[b] @ F
        F = H @ F
        if "base_d2" in arrays or "base_perm2" in arrays:
            if "base_d2" in arrays:
                F = np.diag(np.asarray(arrays["base_d2"], dtype=np.float64)[b]) @ F
            if "base_perm2" in arrays:
                F = gather("base_perm2")[b] @ F
            F = H @ F
        if "base_d3" in arrays:
            F = np.diag(np.asarray(arrays["base_d3"], dtype=np.float64)[b]) @ F
        blocks.append(F)
    W0 = np.zeros((n_out, n_in))
    if n_out >= n_in:  # tall: block b produces outputs [bL, (b+1)L) from the zero-padded x
        for b in range(B):
            lo, hi = b * L, min(n_out, (b + 1) * L)
            if lo < hi:
                W0[lo:hi] = blocks[b][: hi - lo, :n_in]
    else:  # wide: block b reads inputs [bL, (b+1)L), outputs summed
        for b in range(B):
            lo, hi = b * L, min(n_in, (b + 1) * L)
            if lo < hi:
                W0[:, lo:hi] += blocks[b][:n_out, : hi - lo]
    return W0


def reference_base_xor(arrays: Mapping[str, np.ndarray], n_in: int, n_out: int) -> np.ndarray:
    """W0 from the XOR closed form (spec §2.3): h2 = H·d2; tall W0[bL+p, i] = h2_b[p ⊕ inv_b[i]],
    wide W0[p, bL+q] = h2_b[p ⊕ inv_b[q]]. Valid for d1 = d3 = 1, no perm2."""
    d2 = np.asarray(arrays["base_d2"], dtype=np.float64)
    B, L = d2.shape
    h2 = d2 @ sylvester_hadamard(L).T
    perm = np.asarray(arrays["base_perm1"]).astype(np.int64)
    inv = np.zeros_like(perm)
    for b in range(B):
        inv[b, perm[b]] = np.arange(L)
    W0 = np.zeros((n_out, n_in))
    for o in range(n_out):
        for i in range(n_in):
            if n_out >= n_in:
                b, p = divmod(o, L)
                W0[o, i] = h2[b, p ^ inv[b, i]]
            else:
                b, q = divmod(i, L)
                W0[o, i] = h2[b, o ^ inv[b, q]]
    return W0


def reference_dense(arrays: Mapping[str, np.ndarray], n_in: int, n_out: int, *, closed_form: bool = False) -> np.ndarray:
    """s ⊙ (W0 + Δ) implied by stored arrays (spec §3.5), float64; block wins over COO (§8.2)."""
    if "base_d1" in arrays:
        W = reference_base_xor(arrays, n_in, n_out) if closed_form else reference_base_chain(arrays, n_in, n_out)
    else:
        W = np.zeros((n_out, n_in))
    if "b_idx" in arrays and "b_val" in arrays:
        idx = np.asarray(arrays["b_idx"]).astype(np.int64)
        val = np.asarray(arrays["b_val"], dtype=np.float64)
        block = val.shape[2]
        for o in range(n_out):
            for k in range(idx.shape[1]):
                j = idx[o, k]
                for t in range(block):
                    c = j * block + t
                    if j >= 0 and c < n_in:
                        W[o, c] += val[o, k, t]
    else:
        idx = np.asarray(arrays["d_idx"]).astype(np.int64)
        val = np.asarray(arrays["d_val"], dtype=np.float64)
        for o in range(n_out):
            for r in range(idx.shape[1]):
                if 0 <= idx[o, r] < n_in:
                    W[o, idx[o, r]] += val[o, r]
    if "d_row_scale" in arrays:
        W *= np.asarray(arrays["d_row_scale"], dtype=np.float64).reshape(-1)[:, None]
    if "dr_idx" in arrays:  # extension dense_rows/1: listed rows are the stored dense rows
        for r, o in enumerate(np.asarray(arrays["dr_idx"]).tolist()):
            W[o, :] = np.asarray(arrays["dr_val"], dtype=np.float64)[r]
    return W


def reference_apply(t: Mapping[str, np.ndarray], n_in: int, n_out: int, x: np.ndarray, absolute: bool = False) -> np.ndarray:
    """Spec semantics in float64 for x (T, n_in). absolute=True evaluates the bound M instead."""
    f = (lambda a: np.abs(a.astype(np.float64))) if absolute else (lambda a: a.astype(np.float64))
    xs = f(x)
    y = np.zeros((x.shape[0], n_out))
    if "base_d1" in t:
        d1 = t["base_d1"].reshape(-1, t["base_d1"].shape[-1])
        B, L = d1.shape
        H = np.abs(sylvester_hadamard(L)) if absolute else sylvester_hadamard(L)

        def get(k: str) -> np.ndarray | None:
            return None if k not in t else t[k].reshape(B, L)

        d2, d3, p1, p2 = get("base_d2"), get("base_d3"), get("base_perm1"), get("base_perm2")

        def F(v: np.ndarray, b: int) -> np.ndarray:  # v (L,)
            v = v * f(d1[b])
            if p1 is not None:
                v = v[np.where((p1[b] >= 0) & (p1[b] < L), p1[b], 0)]
            v = H @ v
            if d2 is None and p2 is None:
                return v * f(d3[b]) if d3 is not None else v
            if d2 is not None:
                v = v * f(d2[b])
            if p2 is not None:
                v = v[np.where((p2[b] >= 0) & (p2[b] < L), p2[b], 0)]
            v = H @ v
            return v * f(d3[b]) if d3 is not None else v

        for ti in range(x.shape[0]):
            if n_out >= n_in:
                xh = np.zeros(L)
                xh[:n_in] = xs[ti]
                y[ti] = np.concatenate([F(xh, b) for b in range(B)])[:n_out]
            else:
                acc = np.zeros(L)
                for b in range(B):
                    chunk = np.zeros(L)
                    part = xs[ti, b * L:(b + 1) * L]
                    chunk[:part.size] = part
                    acc += F(chunk, b)
                y[ti] = acc[:n_out]
    for ti in range(x.shape[0]):
        for o in range(n_out):
            dot = 0.0
            if "b_idx" in t:
                blk = t["b_val"].shape[2]
                for k, j in enumerate(t["b_idx"][o]):
                    j = int(j)
                    if j < 0 or j * blk >= n_in:
                        continue
                    for tt in range(min(blk, n_in - j * blk)):
                        dot += f(t["b_val"][o, k, tt]) * xs[ti, j * blk + tt]
            else:
                for r, i in enumerate(t["d_idx"][o]):
                    i = int(i)
                    if 0 <= i < n_in:
                        dot += f(t["d_val"][o, r]) * xs[ti, i]
            y[ti, o] += dot
    if "d_row_scale" in t:
        y *= f(t["d_row_scale"])[None, :]
    if "dr_idx" in t:  # extension dense_rows/1
        for r, o in enumerate(np.asarray(t["dr_idx"]).tolist()):
            y[:, o] = xs @ f(np.asarray(t["dr_val"])[r])
    return y


# ---------------------------------------------------------------------------------- variant sdq
def reference_sdq_dense(arrays: Mapping[str, object], n_in: int, n_out: int) -> np.ndarray:
    """Ŵ of a weight of the variant sdq (docs/file-format.md, extension version 1) in float64, from the
    definition: s ⊙ (Q·R + Δ), with

    * Q the base dequantized by gguf-py (`arrays["sdq_base"]`: a RawTensor, or an F16/F32 array);
    * R = blockdiag_k(H_b·diag(sign_k)/√b) as an explicit matrix (`sdq_rot` (n_in/b, b); absent: I);
    * Δ entry by entry: COO (`sdq_idx`, `sdq_val`), or compact — walking each row's 256-column blocks
      in order, taking `sdq_ccnt[o, blk]` entries per block: index 256·blk + `sdq_coff` (a byte),
      value `sdq_cval` (int8) · `sdq_cscale[o]`;
    * s = `sdq_scale` (absent: 1)."""
    from gguf.quants import dequantize

    base = arrays["sdq_base"]
    if hasattr(base, "tensor_type"):
        data, qtype = base.data, base.tensor_type  # type: ignore[attr-defined]
        Q = np.asarray(dequantize(np.asarray(data), qtype), dtype=np.float64).reshape(n_out, n_in)
    else:
        Q = np.asarray(base, dtype=np.float64).reshape(n_out, n_in)
    W = Q
    if "sdq_rot" in arrays:
        signs = np.asarray(arrays["sdq_rot"]).astype(np.float64)
        nb, b = signs.shape
        H = sylvester_hadamard(b)
        R = np.zeros((n_in, n_in))
        for k in range(nb):
            R[k * b:(k + 1) * b, k * b:(k + 1) * b] = H @ np.diag(signs[k]) / np.sqrt(b)
        W = Q @ R
    W = np.array(W, copy=True)
    if "sdq_idx" in arrays:
        idx = np.asarray(arrays["sdq_idx"]).astype(np.int64)
        val = np.asarray(arrays["sdq_val"], dtype=np.float64)
        for o in range(n_out):
            for r in range(idx.shape[1]):
                W[o, idx[o, r]] += val[o, r]
    elif "sdq_coff" in arrays:
        off = np.asarray(arrays["sdq_coff"]).view(np.uint8)
        cnt = np.asarray(arrays["sdq_ccnt"]).view(np.uint8)
        q = np.asarray(arrays["sdq_cval"]).astype(np.int64)
        step = np.asarray(arrays["sdq_cscale"], dtype=np.float64).reshape(-1)
        for o in range(n_out):
            r = 0
            for blk in range(cnt.shape[1]):
                for _ in range(int(cnt[o, blk])):
                    W[o, 256 * blk + int(off[o, r])] += float(q[o, r]) * step[o]
                    r += 1
    if "sdq_scale" in arrays:
        W *= np.asarray(arrays["sdq_scale"], dtype=np.float64).reshape(-1)[:, None]
    return W
