"""Shared test helpers. Tiny models are built in fixtures, never at import."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------- capture
def allowed_keys(lq: int, lk: int, causal=None, window=(-1, -1)) -> torch.Tensor:
    """Bool (Lq, Lk): which keys each query may attend to, as each kernel documents it.

    PyTorch, ``scaled_dot_product_attention`` (its reference implementation in the docs):
    ``is_causal`` -> ``torch.ones(L, S, dtype=torch.bool).tril(diagonal=0)``, the top-left
    corner. FlashAttention, ``flash_attn_func`` docstring: "the causal mask is aligned to
    the bottom right corner of the attention matrix" and, with ``window_size != (-1, -1)``,
    "query at position i will only attend to keys between [i + seqlen_k - seqlen_q -
    window_size[0], i + seqlen_k - seqlen_q + window_size[1]] inclusive".
    """
    keep = torch.ones(lq, lk, dtype=torch.bool)
    if causal == "top_left":
        if max(window) >= 0:
            raise ValueError("local windows are FlashAttention's; its masks are bottom-right aligned")
        return keep.tril(diagonal=0)
    d = lk - lq  # FlashAttention's diagonal: the last query sees the last key
    if causal == "bottom_right":
        keep &= torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=d)
    if window[1] >= 0:
        keep &= torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=d + window[1])
    if window[0] >= 0:
        keep &= torch.ones(lq, lk, dtype=torch.bool).triu(diagonal=d - window[0])
    return keep


def reference_probs(q, k, mask=None, causal=None, scale=None, window=(-1, -1), softcap=0.0):
    """Float64 eager attention probabilities, head-averaged: (B, Lq, Lk).

    q (B, H, Lq, E), k (B, Hk, Lk, E) with grouped heads expanded by repeat_interleave (as
    PyTorch's enable_gqa reference does); ``mask`` bool (True = attend) or additive;
    ``causal`` "top_left" (SDPA) or "bottom_right" (FlashAttention), ``window``
    FlashAttention's local window: :func:`allowed_keys`. Fully masked rows -> 0.
    """
    q, k = q.double(), k.double()
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = scale if scale is not None else 1 / math.sqrt(q.shape[-1])
    scores = q @ k.transpose(-1, -2) * s
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    lq, lk = scores.shape[-2:]
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.double()
    scores = scores.masked_fill(~allowed_keys(lq, lk, causal, window), float("-inf"))
    p = torch.softmax(scores, dim=-1)
    p = torch.where(torch.isnan(p), torch.zeros_like(p), p)
    return p.mean(dim=1)


class SdpaAttention(nn.Module):
    """An attention block written against F.scaled_dot_product_attention: self-attention, or
    cross-attention over ``context`` when one is given."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.h = heads
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x, context=None):
        ctx = x if context is None else context
        b = x.shape[0]
        split = lambda t: t.view(b, -1, self.h, t.shape[-1] // self.h).transpose(1, 2)  # (B, H, L, hd)
        o = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(ctx)), split(self.v(ctx)))
        return o.transpose(1, 2).reshape(b, -1, x.shape[-1])


@pytest.fixture
def fused_encoder_calls(monkeypatch):
    """A one-item list counting the calls of torch's fused TransformerEncoderLayer path."""
    fused = torch._transformer_encoder_layer_fwd
    count = [0]

    def counting(*args, **kwargs):
        count[0] += 1
        return fused(*args, **kwargs)

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", counting)
    return count


@pytest.fixture
def ref_probs():
    return reference_probs


# ---- tiny backend fixtures (backends/audioldm2.py, backends/stable_audio.py) ---------------
# Built once per session; each skips cleanly when its optional dependency is missing.



@pytest.fixture(scope="session")
def tiny_audioldm2():
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from aiba.backends.audioldm2 import build_tiny

    return build_tiny(seed=0)


@pytest.fixture(scope="session")
def tiny_sat_dit():
    """``(DiffusionTransformer, conditioner)`` of stable-audio-tools, tiny and random."""
    pytest.importorskip("stable_audio_tools")
    pytest.importorskip("transformers")
    from aiba.backends.stable_audio import build_tiny_conditioner, build_tiny_dit

    return build_tiny_dit(seed=0), build_tiny_conditioner(seed=0)


@pytest.fixture(scope="session")
def tiny_sao_pipeline():
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from aiba.backends.stable_audio import build_tiny_pipeline

    return build_tiny_pipeline(seed=0)


@pytest.fixture(scope="session")
def audioldm2_backend(tiny_audioldm2):
    from aiba.backends.audioldm2 import AudioLDM2Backend

    return AudioLDM2Backend(tiny_audioldm2)


@pytest.fixture(scope="session")
def sat_backend(tiny_sat_dit):
    """The stable-audio-tools DiT adapter without a decoder (audio = the final latent)."""
    from aiba.backends.stable_audio import StableAudioBackend, TinyDiTConfig

    dit, cond = tiny_sat_dit
    return StableAudioBackend(dit, cond, None, sample_rate=4000, hop=4, latent_len=TinyDiTConfig().latent_len)


@pytest.fixture(scope="session")
def sao_backend(tiny_sao_pipeline):
    from aiba.backends.stable_audio import StableAudioDiffusersBackend

    return StableAudioDiffusersBackend(tiny_sao_pipeline)


def make_mha_model(seed: int = 0, channels: int = 4, dim: int = 16, text_dim: int = 8):
    """A tiny latent model whose self- and cross-attention are nn.MultiheadAttention.

    forward(x (B, C, T, F), context (B, L, text_dim)) -> (B, C, T, F); queries are the
    T x F latent in time-major raster order.
    """
    from torch import nn

    class TinyMHAModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Conv2d(channels, dim, 1)
            self.self_attn = nn.MultiheadAttention(dim, 2, batch_first=True)
            self.cross_attn = nn.MultiheadAttention(dim, 2, kdim=text_dim, vdim=text_dim, batch_first=True)
            self.out = nn.Conv2d(dim, channels, 1)

        def forward(self, x, context):
            b, _, t, f = x.shape
            h = self.inp(x).flatten(2).transpose(1, 2)  # (B, T*F, D)
            h = h + self.self_attn(h, h, h, need_weights=False)[0]
            h = h + self.cross_attn(h, context, context, need_weights=False)[0]
            return self.out(h.transpose(1, 2).reshape(b, dim, t, f))  # (B, C, T, F)

    torch.manual_seed(seed)
    return TinyMHAModel().eval()


@pytest.fixture
def mha_model():
    """``(model, (x, context))``: the nn.MultiheadAttention model and example inputs."""
    model = make_mha_model()
    g = torch.Generator().manual_seed(1)
    return model, (torch.randn(1, 4, 6, 5, generator=g), torch.randn(1, 7, 8, generator=g))


# ---- end of tiny backend fixtures -----------------------------------------------------------


# --------------------------------------------------------------------------- band alignment
# (data, render, templates, tables): a rendered mini-Slakh shared by the session.
@pytest.fixture(scope="session")
def mini_slakh(tmp_path_factory):
    """Two 3 s mini-Slakh tracks at 16 kHz, rendered once; skipped when FluidSynth is absent."""
    from aiba.data.render import RenderConfig, fluidsynth_available, make_dataset

    if not fluidsynth_available():
        pytest.skip("FluidSynth (libfluidsynth3 + pyfluidsynth) not loadable")
    root = tmp_path_factory.mktemp("mini_slakh")
    make_dataset(root, RenderConfig(tracks=2, seconds=3.0, seed=0, sr=16000, synth="fluidsynth"),
                 progress=False)
    return root
