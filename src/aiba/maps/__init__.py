"""Maps: from head-mean probabilities to T x F maps.

In: ``A (B, Lq, Lk)`` per call with the tap's settings (token pooling, latent shape,
prefix tokens, CFG half). Out: per-layer (and per-step) sums on each call's lattice,
resized to the grid and aggregated over layers and steps (Eq. 8) when ``tap.maps()`` is read.
"""
