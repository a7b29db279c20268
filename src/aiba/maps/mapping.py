"""Attention-to-grid mapping (paper Sec. 2.1 and App. A.1; docs/method.md, "Maps").

Per call: head-mean probabilities ``A`` (B, Lq, Lk) -> one value per query (token pooling,
Eqs. 4-7) -> the denoiser's latent lattice (T', F') in time-major raster order -> bilinear
resize (align_corners=False) to the (target_T, target_F) grid (Eq. 3). Aggregation across
layers and steps (Eq. 8) lives in :class:`aiba.AttnTap`; the learned layer weights are fitted
here by :func:`fit_layer_weights`.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from ..errors import AibaError

__all__ = [
    "POOLS",
    "AGGREGATES",
    "PADDINGS",
    "candidate_lattices",
    "find_lattice",
    "to_lattice",
    "resize",
    "token_weights",
    "resolve_spec",
    "pool_queries",
    "fit_layer_weights",
]

POOLS = ("mean", "max", "softmax", "subset", None)
AGGREGATES = ("mean", "max")  # over layers and steps: weighted mean, or cellwise max
PADDINGS = ("border", "zeros", "reflection")

Lattice = tuple[int, int]  # (T', F'); a time-only lattice has F' == 1 and is flagged by the tap


def candidate_lattices(latent_shape: Sequence[int], max_levels: int = 8) -> list[Lattice]:
    """Lattices of a latent downsampled by strides 1, 2, 4, ... (ceil for odd sizes).

    ``latent_shape`` is (T, F) for a time x frequency latent, or (T,) for a time-only one.
    """
    t = int(latent_shape[0])
    f = int(latent_shape[1]) if len(latent_shape) > 1 else 1
    out: list[Lattice] = []
    for level in range(max_levels + 1):
        s = 2**level
        lat = (math.ceil(t / s), math.ceil(f / s) if len(latent_shape) > 1 else 1)
        if lat not in out:
            out.append(lat)
        if lat[0] == 1 and lat[1] == 1:
            break
    return out


def find_lattice(n_tokens: int, latent_shape: Sequence[int], *, name: str = "?", extra: Sequence[Lattice] = ()) -> Lattice:
    """The lattice whose T' x F' equals ``n_tokens`` (after prefix tokens are stripped)."""
    tried = list(extra) + candidate_lattices(latent_shape)
    for lat in tried:
        if lat[0] * lat[1] == n_tokens:
            return lat
    raise AibaError(
        f"layer {name!r}: {n_tokens} query tokens fit no lattice of latent shape {tuple(latent_shape)}; "
        f"tried (T', F') = {tried} (products {[a * b for a, b in tried]}). Set latent_shape= or prefix_tokens= on the tap."
    )


def to_lattice(values: torch.Tensor, lattice: Lattice) -> torch.Tensor:
    """(..., N) values in time-major raster order -> (..., T', F'), index = t * F' + f."""
    t, f = lattice
    if values.shape[-1] != t * f:
        raise AibaError(f"{values.shape[-1]} values do not fill a lattice of {t} x {f}")
    return values.reshape(*values.shape[:-1], t, f)  # (..., T', F')


def resize(grid: torch.Tensor, size: tuple[int, int], padding: str = "border") -> torch.Tensor:
    """Bilinear resize, align_corners=False, of (..., T', F') to (..., T, F).

    ``padding`` decides samples that fall outside the source: "border" repeats the edge cell
    (identical to ``F.interpolate(mode="bilinear", align_corners=False)``), "zeros" blends
    with zeros (darkens the outermost bands), "reflection" mirrors.
    """
    if padding not in PADDINGS:
        raise AibaError(f"padding must be one of {PADDINGS}, got {padding!r}")
    lead = grid.shape[:-2]
    x = grid.reshape(-1, 1, *grid.shape[-2:]).float()  # (N, 1, T', F')
    if padding == "border":
        y = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    else:
        n = x.shape[0]
        ys = (torch.arange(size[0], device=x.device, dtype=torch.float32) + 0.5) / size[0] * 2 - 1
        xs = (torch.arange(size[1], device=x.device, dtype=torch.float32) + 0.5) / size[1] * 2 - 1
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        sample = torch.stack((gx, gy), dim=-1).expand(n, *size, 2)  # (N, T, F, 2): (x=freq, y=time)
        y = F.grid_sample(x, sample, mode="bilinear", padding_mode=padding, align_corners=False)
    return y.reshape(*lead, *size)  # (..., T, F)


def spec_key(spec, k_len: int, name: str = ""):
    """Which entry of a token spec applies to a call: a mapping is looked up first by layer
    pattern (str keys, fnmatch on the layer name, in order), then by key length (int keys)."""
    if not isinstance(spec, Mapping):
        return None
    for key in spec:
        if isinstance(key, str) and fnmatch.fnmatchcase(name, key):
            return key
    return k_len if k_len in spec else _NO_ENTRY


_NO_ENTRY = object()


def resolve_spec(spec, k_len: int, name: str = ""):
    """The token selection a spec gives for one call (see :func:`spec_key`); None = none."""
    if not isinstance(spec, Mapping):
        return spec
    key = spec_key(spec, k_len, name)
    return None if key is _NO_ENTRY else spec[key]


def _token_mask(spec, k_len: int, batch: int, device, *, name: str, what: str) -> torch.Tensor | None:
    """(B|1, Lk) bool mask of the tokens a spec selects, or None when the spec is empty."""
    spec = resolve_spec(spec, k_len, name)
    if spec is None:
        return None
    t = torch.as_tensor(spec, device=device)
    if t.dtype == torch.bool:
        if t.shape[-1] != k_len or t.dim() > 2 or (t.dim() == 2 and t.shape[0] not in (1, batch)):
            raise AibaError(f"layer {name!r}: {what} mask of shape {tuple(t.shape)} does not match (batch={batch}, k_len={k_len})")
        return t.reshape(-1, k_len)
    idx = t.long().reshape(-1)
    if idx.numel() and (int(idx.max()) >= k_len or int(idx.min()) < -k_len):
        raise AibaError(f"layer {name!r}: {what} indices {idx.tolist()} out of range for k_len={k_len}")
    mask = torch.zeros(1, k_len, dtype=torch.bool, device=device)
    mask[0, idx] = True
    return mask


def token_weights(pool: str | None, k_len: int, batch: int, device, *, content=None, tokens=None,
                  relevance=None, tau: float = 1.0, name: str = "?") -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Weights ``W`` (B|1, Lk) so that pooled_i = sum_j W_j A_ij, and the token mask used.

    - ``mean`` (Eq. 4): uniform over the content tokens (``content``; all keys if unknown,
      which makes the map the constant 1/Lk: the tap warns).
    - ``softmax`` (Eq. 6): softmax(r_j / tau) over the content tokens, r = ``relevance``.
    - ``subset`` (Eq. 7): uniform over ``tokens`` (e.g. the instrument-name tokens).
    - ``max`` (Eq. 5): no weights; the mask restricts the max.
    """
    if pool == "subset":
        mask = _token_mask(tokens, k_len, batch, device, name=name, what="tokens")
        if mask is None:
            raise AibaError(f"layer {name!r}: pool='subset' needs tokens= (indices into the {k_len} keys)")
    else:
        mask = _token_mask(content, k_len, batch, device, name=name, what="content")
    if pool == "max" or pool is None:
        return None, mask
    m = mask.float() if mask is not None else torch.ones(1, k_len, device=device)
    if pool in ("mean", "subset"):
        count = m.sum(-1, keepdim=True)
        if bool((count == 0).any()):
            raise AibaError(f"layer {name!r}: the token selection is empty for some batch item (k_len={k_len})")
        return m / count, mask
    if pool == "softmax":
        r = resolve_spec(relevance, k_len, name)
        if r is None:
            raise AibaError(f"layer {name!r}: pool='softmax' needs relevance= scores for the {k_len} keys")
        r = torch.as_tensor(r, device=device, dtype=torch.float32)
        if r.shape[-1] != k_len or r.dim() > 2:
            raise AibaError(f"layer {name!r}: relevance of shape {tuple(r.shape)} must be (k_len,) or (batch, k_len) with k_len={k_len}")
        r = r.reshape(-1, k_len)  # (B|1, Lk)
        logits = (r / tau).masked_fill(m == 0, float("-inf"))
        return torch.softmax(logits, dim=-1), mask
    raise AibaError(f"pool must be one of {POOLS}, got {pool!r}")


def pool_queries(a: torch.Tensor, pool: str | None, weights: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
    """Pool (B, c, Lk) head-mean probabilities to (B, c) per query (or keep (B, c, Lk) for None)."""
    if pool is None:
        return a
    if pool == "max":
        if mask is not None:
            a = a.masked_fill(~mask[:, None, :], float("-inf"))
        return a.amax(dim=-1)  # (B, c)
    return torch.matmul(a, weights.expand(a.shape[0], -1).unsqueeze(-1)).squeeze(-1)  # (B, c, 1) -> (B, c)


def fit_layer_weights(layer_maps: Mapping[str, torch.Tensor] | Sequence[torch.Tensor], targets) -> dict | torch.Tensor:
    """Layer-learned weights (Eq. 8): non-negative, summing to 1, by NNLS (backbone frozen).

    ``layer_maps``: per-layer maps, each (N, T, F) over N held-out samples (a mapping of
    name -> maps, as ``tap.maps().layers`` collects them, or a sequence). ``targets``: (N, T, F)
    ground truth. Solves min_w ||sum_l w_l M_l - G||^2, w >= 0 (scipy.optimize.nnls), then
    normalises w to sum 1. Returns a dict name -> weight for a mapping input, else a tensor.
    """
    from scipy.optimize import nnls
    import numpy as np

    names = list(layer_maps) if isinstance(layer_maps, Mapping) else None
    maps = [layer_maps[n] for n in names] if names else list(layer_maps)
    if not maps:
        raise AibaError("fit_layer_weights needs at least one layer map")
    g = np.asarray(torch.as_tensor(targets).detach().cpu(), dtype=np.float64).reshape(-1)
    cols = []
    for i, m in enumerate(maps):
        col = np.asarray(torch.as_tensor(m).detach().cpu(), dtype=np.float64).reshape(-1)
        if col.shape != g.shape:
            raise AibaError(f"layer {names[i] if names else i}: map has {col.size} cells, targets have {g.size}")
        cols.append(col)
    w, _ = nnls(np.stack(cols, axis=1), g)
    w = w / w.sum() if w.sum() > 0 else np.full(len(maps), 1.0 / len(maps))
    if names:
        return {n: float(x) for n, x in zip(names, w)}
    return torch.as_tensor(w, dtype=torch.float32)
