"""The test reference itself, against the kernels' documented masks and PyTorch's own SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from conftest import allowed_keys, reference_probs


def test_flash_attn_causal_masks_match_its_docstring_examples():
    # flash_attn_func: "if seqlen_q = 2 and seqlen_k = 5, the causal mask (1 = keep, 0 = masked out) is:"
    assert allowed_keys(2, 5, "bottom_right").int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    # "if seqlen_q = 5 and seqlen_k = 2, the causal mask is:"
    assert allowed_keys(5, 2, "bottom_right").int().tolist() == [[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]]


def test_flash_attn_window_is_the_documented_interval():
    lq, lk, left, right = 3, 6, 1, 0
    keep = allowed_keys(lq, lk, None, (left, right))
    for i in range(lq):
        lo, hi = i + lk - lq - left, i + lk - lq + right  # "[... ] inclusive"
        assert keep[i].nonzero().flatten().tolist() == [j for j in range(lk) if lo <= j <= hi]


def test_sdpa_causal_is_top_left():
    assert allowed_keys(2, 5, "top_left").int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]


def test_reference_matches_pytorch_sdpa_probabilities():
    """With identity values, SDPA's output rows are its attention probabilities."""
    torch.manual_seed(0)
    for lq, lk, causal in ((4, 4, False), (5, 7, True), (3, 3, True)):
        q, k = torch.randn(2, 3, lq, 8, dtype=torch.float64), torch.randn(2, 3, lk, 8, dtype=torch.float64)
        eye = torch.eye(lk, dtype=torch.float64).expand(2, 3, lk, lk)
        p = F.scaled_dot_product_attention(q, k, eye, is_causal=causal).mean(dim=1)  # (B, Lq, Lk)
        torch.testing.assert_close(reference_probs(q, k, causal="top_left" if causal else None), p)
