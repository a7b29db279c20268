"""``aiba demo``: capture a built-in tiny model whose cross-attention points at known cells.

:class:`PlantedCrossAttention` is a plain torch model with a few cross-attention layers over
a (T, F) latent at different strides (ceil for odd sizes). Its queries and keys are built
so that each layer's softmax sends the queries of one target region to one content token
and every other query to a "sink" token (as real text encoders' special tokens absorb
attention). Pooling over the content tokens must therefore peak at the planted region on
every layer: the demo checks that, prints what it captured, and saves a heat map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import atomic_write
from ..errors import AibaError

__all__ = ["PlantedCrossAttention", "PlantedSite", "run_demo", "save_heatmap", "register"]


class PlantedCrossAttention(nn.Module):
    """Cross-attention layers whose probabilities peak at a planted lattice region.

    ``latent_shape``: (T, F) (or (T,) for a time-only latent); ``target``: the planted
    position as fractions (t, f) in [0, 1); ``strides``: one layer per stride; the layer
    with stride s has queries on the lattice (ceil(T/s), ceil(F/s)) in time-major order.
    Keys: token 0 is the sink, tokens 1..n_tokens are content; token ``token`` is the one
    the target region attends to. ``prefix``: tokens prepended to every query sequence.
    """

    def __init__(self, latent_shape: Sequence[int] = (9, 7), target: Sequence[float] = (0.2, 0.7),
                 strides: Sequence[int] = (1, 2), n_tokens: int = 4, token: int = 2, heads: int = 2,
                 sharpness: float = 12.0, prefix: int = 0):
        super().__init__()
        if not 1 <= token <= n_tokens:
            raise AibaError(f"token must be a content token in 1..{n_tokens}, got {token}")
        self.latent_shape = tuple(int(v) for v in latent_shape)
        self.target = tuple(float(v) for v in target)
        self.strides, self.n_tokens, self.token = tuple(strides), n_tokens, token
        self.heads, self.sharpness, self.prefix = heads, sharpness, prefix
        self.dim = n_tokens + 1  # one-hot key space per head
        self.layers = nn.ModuleList(PlantedSite(self, s) for s in self.strides)

    def lattice(self, stride: int) -> tuple[int, int]:
        t = math.ceil(self.latent_shape[0] / stride)
        f = math.ceil(self.latent_shape[1] / stride) if len(self.latent_shape) > 1 else 1
        return t, f

    def target_cell(self, stride: int) -> tuple[int, int]:
        t, f = self.lattice(stride)
        return int(self.target[0] * t), int(self.target[1] * f) if f > 1 else 0

    def forward(self, batch: int = 1) -> torch.Tensor:
        k = torch.eye(self.dim).expand(batch, self.heads, -1, -1)  # (B, H, Lk, E)
        return torch.cat([layer(k).flatten(1) for layer in self.layers], dim=1)


class PlantedSite(nn.Module):
    """One cross-attention layer of :class:`PlantedCrossAttention` at one stride."""

    def __init__(self, parent: PlantedCrossAttention, stride: int):
        super().__init__()
        self.stride = stride
        t, f = parent.lattice(stride)
        ct, cf = parent.target_cell(stride)
        hit = torch.zeros(t, f, dtype=torch.bool)
        hit[ct, cf] = True
        token = torch.where(hit.reshape(-1), parent.token, 0)  # (N,): which key each query seeks
        q = F.one_hot(token, parent.dim).float() * parent.sharpness  # (N, E)
        if parent.prefix:
            q = torch.cat([torch.zeros(parent.prefix, parent.dim), q])  # (prefix + N, E)
        self.register_buffer("q", q, persistent=False)
        self.heads = parent.heads

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        """``context``: the text keys (B, H, Lk, E); naming it so tags the call "cross"."""
        q = self.q.expand(context.shape[0], self.heads, -1, -1)  # (B, H, Lq, E)
        return F.scaled_dot_product_attention(q, context, context)  # (B, H, Lq, E)


def run_demo(out: str | Path | None = "aiba-demo.png", target_T: int = 32, target_F: int = 16) -> dict:
    """Capture the planted model, check where its maps peak, optionally save a PNG."""
    from .. import AttnTap, combined_patch

    model = PlantedCrossAttention()
    content = list(range(1, model.n_tokens + 1))  # every key but the sink
    tap = AttnTap(target_T=target_T, target_F=target_F, pool="mean", latent_shape=model.latent_shape,
                  content=content, keep="probs")
    with torch.no_grad(), combined_patch(tap, model=model):
        model(batch=1)
    if not tap.store:
        raise AibaError("no attention captured")
    maps = tap.maps()
    report = {"calls": [], "overall_peak": None, "png": None}
    for rec in tap.store:
        report["calls"].append(dict(name=rec.name, kernel=rec.kernel, kind=rec.kind, q_len=rec.q_len,
                                    k_len=rec.k_len, heads=rec.heads, lattice=rec.lattice))
    flat = maps.overall[0].argmax()
    report["overall_peak"] = (int(flat // target_F), int(flat % target_F))
    ct, cf = model.target_cell(1)  # the planted cell's centre on the grid
    report["expected_peak_region"] = ((ct + 0.5) / model.lattice(1)[0] * target_T, (cf + 0.5) / model.lattice(1)[1] * target_F)
    if out is not None:
        report["png"] = str(save_heatmap(maps.overall[0], out, title="aiba demo: planted cross-attention"))
    return report


def save_heatmap(grid: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """Save a (T, F) map as a time x mel heat map (time on x, low bands at the bottom)."""
    _matplotlib()
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    im = ax.imshow(grid.T.numpy(), origin="lower", aspect="auto", cmap="magma")
    ax.set_xlabel("time frame")
    ax.set_ylabel("mel bin")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="attention")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)
    return path


def _matplotlib() -> None:
    try:
        import matplotlib
    except ImportError:
        raise AibaError("drawing the heat map needs matplotlib: pip install 'aiba[eval]'", kind="missing") from None
    matplotlib.use("Agg")


def _image_format(path) -> str:
    """The image format matplotlib will write ``path`` in (from its suffix), checked before any work."""
    _matplotlib()
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    fmt = Path(path).suffix.lower().lstrip(".")
    if fmt not in formats:
        raise AibaError(f"--out {path}: the heat map is an image; end the name in one of "
                        f"{', '.join('.' + f for f in sorted(formats))} (e.g. aiba-demo.png)")
    return fmt


def _cmd(args) -> int:
    from ..settings import writable_file

    writable_file("--out", args.out)
    _image_format(args.out)
    report = run_demo(args.out)
    print(f"{'layer':10} {'kernel':6} {'kind':6} {'q x k':>8}  lattice")
    for c in report["calls"]:
        print(f"{c['name']:10} {c['kernel']:6} {c['kind']:6} {c['q_len']:>4}x{c['k_len']:<3}  {c['lattice']}")
    t, f = report["expected_peak_region"]
    print(f"overall map peaks at (time, mel) = {report['overall_peak']}; planted near ({t:.1f}, {f:.1f})")
    if report["png"]:
        print(f"heat map: {report['png']}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="capture a built-in tiny model and show where its attention points")
    p.add_argument("--out", default="aiba-demo.png", help="where to save the heat map PNG")
    p.set_defaults(func=_cmd)
