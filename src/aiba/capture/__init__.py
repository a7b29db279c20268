"""Capture: the kernel shims, the exact recompute and the tap.

In: every attention call a model makes inside ``combined_patch`` (SDPA,
``nn.MultiheadAttention``, xformers, flash_attn), with the caller's q, k and mask.
Out: the kernel's own output, untouched; per call a record in ``tap.store`` and the
head-mean probabilities ``A (B, Lq, Lk)``, recomputed exactly, handed to :mod:`aiba.maps`.
"""
