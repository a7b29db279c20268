"""Exact attention probabilities, recomputed in float32 query chunks under a byte budget.

The fused kernel never hands back its softmax, so the shims recompute it from the very
``q``/``k``/mask the kernel saw: ``P = softmax(q k^T * scale + bias)`` (Vaswani et al. 2017,
Eq. 1), one block of query rows at a time so the temporaries stay under ``budget_bytes``.
Only the head mean ``A = mean_h P`` leaves this module (DESIGN.md, "Definitions").
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .errors import AibaError

__all__ = ["AttnInputs", "chunk_rows", "head_mean_chunks", "head_mean_probs"]

# fp32 tensors of shape (B, H, rows, Lk) alive at once inside a chunk: scores and softmax
_LIVE_SCORE_TENSORS = 2


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

    def select_batch(self, rows: slice | None) -> "AttnInputs":
        """The same call restricted to batch items ``rows`` (e.g. the conditional CFG half):
        views, no copies."""
        if rows is None:
            return self
        bias = self.bias
        if bias is not None and bias.dim() == 4 and bias.shape[0] != 1:
            bias = bias[rows]
        return AttnInputs(self.q[rows], self.k[rows], self.scale, bias, self.causal, self.window, self.softcap)


def chunk_rows(batch: int, heads: int, k_len: int, budget_bytes: int) -> int:
    """Query rows per chunk so that the fp32 score temporaries stay under ``budget_bytes``."""
    per_row = _LIVE_SCORE_TENSORS * batch * heads * k_len * 4
    return max(1, int(budget_bytes) // max(per_row, 1))


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


def head_mean_chunks(x: AttnInputs, budget_bytes: int = 64 << 20) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(start, stop, A)``: exact head-mean probabilities of query rows start:stop.

    ``A`` has shape (B, stop - start, Lk), float32, on the inputs' device. Rows whose keys
    are all masked give zeros (never NaN). Runs without autograd.
    """
    b, h, lq, lk = x.shape
    hk = x.k.shape[1]
    g = h // hk
    scale = x.scale if x.scale is not None else 1.0 / math.sqrt(x.q.shape[-1])
    rows = chunk_rows(b, h, lk, budget_bytes)
    bias = x.bias
    if bias is not None:
        while bias.dim() < 4:
            bias = bias.unsqueeze(0)
        bb, bh = bias.shape[0], bias.shape[1]
        if bh not in (1, h) or bb not in (1, b) or bias.shape[-1] not in (1, lk) or bias.shape[-2] not in (1, lq):
            raise AibaError(f"attention mask {tuple(x.bias.shape)} does not broadcast to (B, H, Lq, Lk) = {(b, h, lq, lk)}")
        # grouped view (B|1, Hk|1, g|1, Lq|1, Lk|1) matching the score layout below
        bias = bias.reshape(bb, hk, g, *bias.shape[-2:]) if bh == h else bias.unsqueeze(2)
    # only a mask or a causal/local window can leave a row with no key (softmax -> NaN)
    maskable = bias is not None or x.causal is not None or max(x.window) >= 0
    with torch.no_grad():
        kt = x.k.float().transpose(-1, -2).unsqueeze(2)  # (B, Hk, 1, E, Lk)
        q5 = x.q.view(b, hk, g, lq, -1)  # (B, Hk, g, Lq, E)
        for start in range(0, lq, rows):
            stop = min(lq, start + rows)
            scores = torch.matmul(q5[:, :, :, start:stop].float(), kt).mul_(scale)  # (B, Hk, g, c, Lk)
            if x.softcap:
                scores = torch.tanh(scores.div_(x.softcap)).mul_(x.softcap)
            if bias is not None:
                part = bias[..., start:stop, :] if bias.shape[-2] != 1 else bias
                if part.dtype == torch.bool:
                    scores.masked_fill_(~part, float("-inf"))
                else:
                    scores.add_(part.float())
            allowed = _position_mask(x.causal, x.window, torch.arange(start, stop, device=scores.device), lq, lk)
            if allowed is not None:
                scores.masked_fill_(~allowed, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            if maskable:
                probs.nan_to_num_(0.0)  # fully masked rows -> 0
            del scores
            yield start, stop, probs.mean(dim=(1, 2))  # (B, c, Lk)


def head_mean_probs(x: AttnInputs, budget_bytes: int = 64 << 20) -> torch.Tensor:
    """All rows at once: (B, Lq, Lk) float32 head-mean probabilities."""
    b, _, lq, lk = x.shape
    out = torch.empty(b, lq, lk, dtype=torch.float32, device=x.q.device)
    for start, stop, a in head_mean_chunks(x, budget_bytes):
        out[:, start:stop] = a
    return out
