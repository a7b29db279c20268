"""Exact attention probabilities, recomputed in float32 query chunks under a byte budget.

The fused kernel never hands back its softmax, so the shims recompute it from the very
``q``/``k``/mask the kernel saw: ``P = softmax(q k^T * scale + bias)`` (Vaswani et al. 2017,
Eq. 1), one block of query rows at a time so the temporaries stay under ``budget_bytes``.

Per chunk the recompute is one ``baddbmm`` (the scale rides on it) into a float32 block that
the softmax overwrites in place; every chunk reuses that block. :func:`prob_chunks` lays the
block out either keys-last (B, H, c, Lk) or keys-first (B, Hk, Lk, g, c): keys-first puts the
head and key axes next to each other, so a head mean followed by a weighted sum over keys is a
single matmul against one weight vector (what the tap's cross-attention pooling does).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..errors import AibaError

__all__ = ["AttnInputs", "chunk_rows", "prob_chunks", "head_mean_chunks", "head_mean_probs", "fold_pooled_item"]

_F32 = torch.float32
_NEG_INF = float("-inf")
_DUMMY: dict = {}  # device -> (1, 1, 1) placeholder for baddbmm(beta=0), whose values are never read


@dataclass
class AttnInputs:
    """One attention call in canonical form.

    ``q``: (B, H, Lq, E); ``k``: (B, Hk, Lk, E) with ``H % Hk == 0`` (grouped-query heads
    share key heads in contiguous groups, as ``repeat_interleave`` does).
    ``bias``: ``None``, a bool mask (True = attend) or an additive float mask, broadcastable
    to (B, H, Lq, Lk). ``causal``: "top_left" (PyTorch SDPA), "bottom_right" (FlashAttention
    2.1+) or None. ``window``: FlashAttention's (left, right) local window, -1 = unbounded.
    ``softcap``: FlashAttention's tanh soft-capping of the scores (0 = off).
    """

    q: torch.Tensor
    k: torch.Tensor
    scale: float | None = None
    bias: torch.Tensor | None = None
    causal: str | None = None
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0

    def __post_init__(self) -> None:
        if self.q.dim() != 4 or self.k.dim() != 4:
            raise AibaError(f"expected q (B, H, Lq, E) and k (B, Hk, Lk, E), got q {tuple(self.q.shape)} k {tuple(self.k.shape)}")
        b, h, _, e = self.q.shape
        bk, hk, _, ek = self.k.shape
        if bk != b or ek != e or hk == 0 or h % hk:
            raise AibaError(
                f"q {tuple(self.q.shape)} and k {tuple(self.k.shape)} do not pair: expected the same batch and "
                f"head size, and query heads ({h}) a multiple of key heads ({hk})"
            )

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, H, Lq, Lk)."""
        b, h, lq, _ = self.q.shape
        return b, h, lq, self.k.shape[-2]

    @property
    def maskable(self) -> bool:
        """Whether a row can lose every key (a mask, a causal or local window): softmax -> NaN."""
        return self.bias is not None or self.causal is not None or max(self.window) >= 0

    def select_batch(self, rows: slice | None) -> "AttnInputs":
        """The same call restricted to batch items ``rows`` (e.g. the conditional CFG half):
        views, no copies."""
        if rows is None:
            return self
        bias = self.bias
        if bias is not None and bias.dim() == 4 and bias.shape[0] != 1:
            bias = bias[rows]
        return AttnInputs(self.q[rows], self.k[rows], self.scale, bias, self.causal, self.window, self.softcap)


def chunk_rows(batch: int, heads: int, k_len: int, budget_bytes: int, *, row_bytes: int = 0, fixed_bytes: int = 0) -> int:
    """Query rows per chunk so that the recompute's temporaries stay within ``budget_bytes``.

    A chunk of ``rows`` query rows holds one float32 block (B, H, rows, Lk) (the softmax runs
    in place, and every chunk reuses the block), plus ``row_bytes`` more per row (a float32
    copy of a half-precision query chunk, a head mean); ``fixed_bytes`` (a float32 copy of k)
    come off the budget first. At least one row: a budget below one row's footprint is
    exceeded by that row.
    """
    per_row = batch * heads * k_len * 4 + int(row_bytes)
    return max(1, (int(budget_bytes) - int(fixed_bytes)) // max(per_row, 1))


def _position_mask(kind: str | None, window: tuple[int, int], rows: torch.Tensor, lq: int, lk: int) -> torch.Tensor | None:
    """Bool (rows, Lk) mask of allowed keys for causal/windowed attention, or None."""
    left, right = window
    if kind is None and left < 0 and right < 0:
        return None
    # FlashAttention aligns causal and local masks to the bottom-right corner; SDPA to the top-left
    offset = lk - lq if (kind == "bottom_right" or (kind is None and (left >= 0 or right >= 0))) else 0
    i = rows[:, None] + offset  # (rows, 1): each query's aligned key position
    j = torch.arange(lk, device=rows.device)[None, :]  # (1, Lk)
    allowed = torch.ones(rows.numel(), lk, dtype=torch.bool, device=rows.device)
    if kind is not None:
        allowed &= j <= i
    if right >= 0:
        allowed &= j <= i + right
    if left >= 0:
        allowed &= j >= i - left
    return allowed


def _f32_3d(t: torch.Tensor, n: int, m: int, e: int) -> torch.Tensor:
    """(B, Hk, [g,] L, E) -> (n, m, E) float32: a view when the layout allows, else one copy."""
    if t.dtype == _F32:
        return t.reshape(n, m, e)
    return t.to(_F32, memory_format=torch.contiguous_format).view(n, m, e)


def _is_view_3d(t: torch.Tensor, n: int, m: int, e: int) -> bool:
    if t.dtype != _F32:
        return False
    try:
        t.view(n, m, e)
    except RuntimeError:
        return False
    return True


def _grouped_bias(x: AttnInputs) -> torch.Tensor | None:
    """The mask as (B|1, Hk|1, g|1, Lq|1, Lk|1), matching the keys-last score layout."""
    bias = x.bias
    if bias is None:
        return None
    b, h, lq, lk = x.shape
    hk = x.k.shape[1]
    while bias.dim() < 4:
        bias = bias.unsqueeze(0)
    bb, bh = bias.shape[0], bias.shape[1]
    if bias.dim() != 4 or bh not in (1, h) or bb not in (1, b) or bias.shape[-1] not in (1, lk) or bias.shape[-2] not in (1, lq):
        raise AibaError(f"attention mask {tuple(x.bias.shape)} does not broadcast to (B, H, Lq, Lk) = {(b, h, lq, lk)}")
    return bias.reshape(bb, hk, h // hk, *bias.shape[-2:]) if bh == h else bias.unsqueeze(2)


def _mask_row_bytes(x: AttnInputs) -> int:
    """Bytes per query row of the mask temporaries (inverted bool masks, position masks, the
    fully-masked-row flags); 0 for a call without mask."""
    if not x.maskable:
        return 0
    b, h, _, lk = x.shape
    n = 2 * lk * 8 + 5 * b * h  # position mask and its comparisons; per-row max (fp32) + flag
    if x.bias is not None:
        bias = x.bias
        n += bias.shape[0] * (bias.shape[1] if bias.dim() == 4 else 1) * lk  # an inverted bool mask
    return n


def _mask_block(p5: torch.Tensor, x: AttnInputs, bias, start: int, stop: int, keys_first: bool) -> torch.Tensor:
    """Apply the call's mask and position rules to the scores of query rows start:stop, in
    place; returns the flags of rows left with no key (True where the softmax gives NaN).
    ``p5``: (B, Hk, g, c, Lk), or (B, Hk, Lk, g, c) with ``keys_first``; ``bias`` grouped
    the same way (:func:`_grouped_bias`)."""
    _, _, lq, lk = x.shape
    if bias is not None:
        if keys_first:
            part = bias[..., start:stop] if bias.shape[-1] != 1 else bias
        else:
            part = bias[..., start:stop, :] if bias.shape[-2] != 1 else bias
        if part.dtype == torch.bool:
            p5.masked_fill_(part.logical_not(), _NEG_INF)
        else:
            p5.add_(part)  # fp32 += any float mask (half promotes exactly)
    allowed = _position_mask(x.causal, x.window, torch.arange(start, stop, device=p5.device), lq, lk)
    if allowed is not None:  # (c, Lk)
        p5.masked_fill_(allowed.logical_not().t()[:, None, :] if keys_first else allowed.logical_not(), _NEG_INF)
    kd = 2 if keys_first else 4  # the key axis of the 5-D block
    return p5.amax(dim=kd, keepdim=True) == _NEG_INF


def prob_chunks(x: AttnInputs, budget_bytes: int = 64 << 20, *, keys_first: bool = False,
                row_bytes: int = 0, fixed_bytes: int = 0) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(start, stop, P)``: exact probabilities of query rows start:stop, float32.

    ``keys_first=False``: P is (B, Hk, g, c, Lk), i.e. (B, H, c, Lk) with head h = hk * g + j;
    ``keys_first=True``: P is (B, Hk, Lk, g, c). c = stop - start. Rows whose keys are all
    masked are zeros (never NaN); NaN or inf in q or k give NaN rows. Every chunk overwrites
    the same block: reduce or copy P before advancing the iterator. ``row_bytes`` and
    ``fixed_bytes``: what the caller keeps per chunk row and per call, counted against
    ``budget_bytes`` (see :func:`chunk_rows`). Runs without autograd.
    """
    b, h, lq, lk = x.shape
    q, k = x.q, x.k
    hk = k.shape[1]
    g = h // hk
    e = q.shape[-1]
    n = b * hk
    scale = x.scale if x.scale is not None else 1.0 / math.sqrt(e)
    bias = _grouped_bias(x)
    if bias is not None and keys_first:
        bias = bias.permute(0, 1, 4, 2, 3)  # (B|1, Hk|1, Lk|1, g|1, Lq|1)
    maskable = x.maskable
    with torch.no_grad():
        k3 = _f32_3d(k, n, lk, e)  # (B*Hk, Lk, E)
        if k3.data_ptr() != k.data_ptr():
            fixed_bytes += k3.numel() * 4
        qg = q.view(b, hk, g, lq, e)  # (B, Hk, g, Lq, E)
        q_copy = g > 1 or not _is_view_3d(qg, n, g * lq, e)
        rows = chunk_rows(b, h, lk, budget_bytes, fixed_bytes=fixed_bytes,
                          row_bytes=row_bytes + (b * h * e * 4 if q_copy else 0) + _mask_row_bytes(x))
        dummy = _DUMMY.get(q.device)
        if dummy is None:
            dummy = _DUMMY[q.device] = torch.empty(1, 1, 1, dtype=_F32, device=q.device)
        buf = None if rows >= lq else torch.empty(n * g * rows * lk, dtype=_F32, device=q.device)
        for start in range(0, lq, rows):
            stop = min(lq, start + rows)
            c = stop - start
            q3 = _f32_3d(qg[:, :, :, start:stop], n, g * c, e)  # (B*Hk, g*c, E)
            out = None if buf is None else buf[: n * g * c * lk].view(n, lk, g * c) if keys_first else buf[: n * g * c * lk].view(n, g * c, lk)
            if keys_first:
                s3 = torch.baddbmm(dummy, k3, q3.transpose(1, 2), beta=0, alpha=scale, out=out)  # (B*Hk, Lk, g*c)
                p5 = s3.view(b, hk, lk, g, c)
            else:
                s3 = torch.baddbmm(dummy, q3, k3.transpose(1, 2), beta=0, alpha=scale, out=out)  # (B*Hk, g*c, Lk)
                p5 = s3.view(b, hk, g, c, lk)
            del q3  # a chunk's copy of q must not outlive it
            if x.softcap:
                s3.div_(x.softcap).tanh_().mul_(x.softcap)
            if maskable:
                dead = _mask_block(p5, x, bias, start, stop, keys_first)
            torch.softmax(s3, 1 if keys_first else 2, out=s3)  # in place
            if maskable:
                p5.masked_fill_(dead, 0.0)  # fully masked rows -> 0, where softmax gave NaN
            yield start, stop, p5


def head_mean_chunks(x: AttnInputs, budget_bytes: int = 64 << 20) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(start, stop, A)``: exact head-mean probabilities of query rows start:stop.

    ``A`` has shape (B, stop - start, Lk), float32, on the inputs' device, and is overwritten
    by the next chunk (copy what you keep). Rows whose keys are all masked give zeros (never
    NaN). Runs without autograd.
    """
    b, h, lq, lk = x.shape
    abuf = None
    for start, stop, p5 in prob_chunks(x, budget_bytes, row_bytes=b * lk * 4):
        c = stop - start
        if abuf is None:
            abuf = torch.empty(b * c * lk, dtype=_F32, device=p5.device)
        a = abuf[: b * c * lk].view(b, c, lk)
        torch.mean(p5.view(b, h, c, lk), dim=1, out=a)  # (B, c, Lk)
        yield start, stop, a


def head_mean_probs(x: AttnInputs, budget_bytes: int = 64 << 20) -> torch.Tensor:
    """All rows at once: (B, Lq, Lk) float32 head-mean probabilities."""
    b, h, lq, lk = x.shape
    out = torch.empty(b, lq, lk, dtype=_F32, device=x.q.device)
    for start, stop, p5 in prob_chunks(x, budget_bytes):
        torch.mean(p5.view(b, h, stop - start, lk), dim=1, out=out[:, start:stop])
    return out


def fold_pooled_item(q: torch.Tensor, k: torch.Tensor, scale: float | None, weights: torch.Tensor, acc: torch.Tensor,
                     alpha: float = 1.0, prefix: int = 0) -> None:
    """One batch item, one chunk, no mask: ``acc += alpha * sum_h weights[h] @ P_h[:, prefix:]``.

    ``q`` (H, Lq, E) and ``k`` (H, Lk, E) (views of one batch item, any strides with a unit
    last stride; half types are copied to float32), ``weights`` (1, H*Lk) float32 (the pooling
    weight of each key / H, tiled over heads: head mean and token pooling in one matmul), ``acc`` (1, Lq - prefix) float32, added
    in place. P_h = softmax(k q^T * scale) over keys, keys-first (Lk, Lq): three kernels for
    float32 inputs (``baddbmm``, in-place ``softmax``, ``addmm_``), five for half types.
    The caller checks that the (H, Lk, Lq) block fits its budget.
    """
    if q.requires_grad or k.requires_grad:
        q, k = q.detach(), k.detach()
    if q.dtype != _F32:
        q, k = q.to(_F32), k.to(_F32)
    dummy = _DUMMY.get(q.device)
    if dummy is None:
        dummy = _DUMMY[q.device] = torch.empty(1, 1, 1, dtype=_F32, device=q.device)
    s = torch.baddbmm(dummy, k, q.transpose(1, 2), beta=0, alpha=scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    torch.softmax(s, 1, out=s)  # (H, Lk, Lq), in place
    s2 = s.view(-1, s.shape[-1])  # (H*Lk, Lq): heads and keys adjacent
    acc.addmm_(weights, s2[:, prefix:] if prefix else s2, alpha=alpha)  # (1, H*Lk) @ (H*Lk, N)
