"""Capture that holds: the fused encoder-layer path, activation checkpointing, errors on
records instead of raised mid-forward, zero-length calls, a tap given twice."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from aiba import AibaError, AttnTap, combined_patch


# ------------------------------------------------ nn.TransformerEncoderLayer fast path
@pytest.mark.parametrize("nested,norm_first", [(False, False), (True, False), (False, True)])
def test_encoder_fast_path_captured_from_weights(nested, norm_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested).eval()
    x = torch.randn(2, 7, 16)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[1, 4:] = True
    with torch.no_grad():
        expected = enc(x, src_key_padding_mask=kpm)
        tap = AttnTap(kinds=("self",), keep="probs")
        with torch.autograd.profiler.profile() as prof, combined_patch(tap, model=enc):
            out = enc(x, src_key_padding_mask=kpm)
    ops = [e.name for e in prof.function_events]
    assert ops.count("aten::_transformer_encoder_layer_fwd") == 2  # the fused path ran inside the block
    assert torch.equal(out, expected)
    assert [(r.name, r.kind, r.kernel, r.q_len, r.k_len, r.heads) for r in tap.store] == [
        (f"layers.{i}.self_attn", "self", "mha", 7, 7, 2) for i in range(2)]
    # reference: the slow path's own need_weights=True weights, layer by layer
    h = x
    with torch.enable_grad():  # parameters requiring grad: the slow path
        for lay, rec in zip(enc.layers, tap.store):
            inp = lay.norm1(h) if norm_first else h
            _, w = lay.self_attn(inp, inp, inp, key_padding_mask=kpm, need_weights=True)
            w = w.detach()
            if nested:  # padded query rows are fully masked (zeros) by design
                w[1, 4:] = 0.0
            torch.testing.assert_close(rec.probs, w, atol=1e-5, rtol=0)
            h = lay(h, src_key_padding_mask=kpm).detach()


# --------------------------------------------------------------- checkpointing
class _Block(nn.Module):
    def __init__(self, d=8, h=2):
        super().__init__()
        self.h = h
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x, context):
        b = x.shape[0]
        split = lambda t: t.view(b, -1, self.h, t.shape[-1] // self.h).transpose(1, 2)  # (B, H, L, hd)
        o = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(context)), split(context))
        return o.transpose(1, 2).reshape(b, -1, x.shape[-1])


class _Net(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.blocks = nn.ModuleList([_Block(), _Block()])

    def forward(self, x, context):
        for blk in self.blocks:
            if self.mode is None:
                x = x + blk(x, context)
            else:
                x = x + checkpoint(blk, x, context, use_reentrant=self.mode == "reentrant")
        return x


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_checkpointed_backward_adds_no_records(mode):
    torch.manual_seed(0)
    net = _Net(mode)
    x, ctx = torch.randn(2, 6, 8, requires_grad=True), torch.randn(2, 3, 8)
    tap = AttnTap(kinds=("cross",), keep="probs")
    # without early stop, non-reentrant recompute re-runs every call of the block in backward
    with torch.utils.checkpoint.set_checkpoint_early_stop(False), combined_patch(tap, model=net):
        net(x, ctx).sum().backward()
    assert [(r.name, r.kind) for r in tap.store] == [("blocks.0", "cross"), ("blocks.1", "cross")]
    g = x.grad.clone()
    x.grad = None
    net.mode = None
    net(x, ctx).sum().backward()
    torch.testing.assert_close(x.grad, g)


def test_unet_gradient_checkpointing_records_each_call_once():
    pytest.importorskip("diffusers")
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                attention_head_dim=2, norm_num_groups=4)
    unet.train()
    args = (torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.randn(1, 5, 8))
    counts = {}
    for ckpt in (False, True):
        if ckpt:
            unet.enable_gradient_checkpointing()
        tap = AttnTap(kinds=("cross", "self"))
        with combined_patch(tap, model=unet):
            unet(*args).sample.sum().backward()
        counts[ckpt] = [(r.name, r.kind) for r in tap.store]
    assert unet.is_gradient_checkpointing
    assert counts[True] == counts[False] and len(counts[True]) > 0


# ------------------------------------------------------------- never raise
def test_recording_errors_go_on_records_and_maps_raise(monkeypatch):
    x = torch.randn(1, 2, 8, 4)
    k = torch.randn(1, 2, 3, 4)
    tap = AttnTap(kinds=("cross",), pool="max", latent_shape=(8,))
    expected = F.scaled_dot_product_attention(x, k, k)

    def boom(*a, **kw):
        raise RuntimeError("lattice exploded")

    monkeypatch.setattr("aiba.maps.mapping.find_lattice", boom)
    with warnings.catch_warnings(record=True) as w, combined_patch(tap):
        warnings.simplefilter("always")
        out1 = F.scaled_dot_product_attention(x, k, k)
        tap.next_step()
        out2 = F.scaled_dot_product_attention(x, k, k)  # the same layer "sdpa.0" at the next step
    assert torch.equal(out1, expected) and torch.equal(out2, expected)
    assert [r.error for r in tap.store] == ["RuntimeError: lattice exploded"] * 2
    assert sum("lattice exploded" in str(m.message) for m in w) == 1  # warned once per layer
    with pytest.raises(AibaError, match="2 attention call"):
        tap.maps()


def test_zero_length_query_or_key_returns_kernel_result():
    q, k = torch.randn(1, 2, 0, 4), torch.randn(1, 2, 5, 4)
    tap = AttnTap(kinds=("cross", "self"), keep="probs", latent_shape=(4,))
    with combined_patch(tap):
        out = F.scaled_dot_product_attention(q, k, k)
        out2 = F.scaled_dot_product_attention(k, q, q)
    assert out.shape == (1, 2, 0, 4) and out2.shape == (1, 2, 5, 4)
    assert [(r.q_len, r.k_len, r.note, r.error, r.captured) for r in tap.store] == [
        (0, 5, "empty", None, False), (5, 0, "empty", None, False)]
    assert not tap.errors


def test_same_tap_twice_sees_each_call_once():
    tap = AttnTap(kinds=("cross", "self"), keep="probs")
    q = torch.randn(1, 1, 4, 8)
    with combined_patch(tap, tap) as taps:
        F.scaled_dot_product_attention(q, q, q)
        with combined_patch(tap):
            F.scaled_dot_product_attention(q, q, q)
    assert taps == (tap, tap) and len(tap.store) == 2


def test_records_selected_only_keeps_counts():
    q, k = torch.randn(1, 2, 8, 4), torch.randn(1, 2, 2, 4)
    tap = AttnTap(kinds=("cross",), records="selected", keep="probs")
    with combined_patch(tap):
        F.scaled_dot_product_attention(q, q, q)  # self: not selected, counted only
        F.scaled_dot_product_attention(q, k, k)
    assert [(r.name, r.kind) for r in tap.store] == [("sdpa.1", "cross")]
    assert tap.counts == {"sdpa.0": 1, "sdpa.1": 1}
    with pytest.raises(AibaError, match="records"):
        AttnTap(records="some")


def test_inputs_built_only_for_selected_calls(monkeypatch):
    """Selection is decided before inputs are built: no MHA projections for a call the tap
    drops, and for the one it keeps exactly one build."""
    import aiba.capture.patch as patch

    built = []
    real = patch.mha_inputs
    monkeypatch.setattr(patch, "mha_inputs", lambda *a, **k: built.append(1) or real(*a, **k))
    mha = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    x, mem = torch.randn(1, 5, 16), torch.randn(1, 3, 16)
    tap = AttnTap(kinds=("cross",), keep="probs")
    with torch.no_grad(), combined_patch(tap, model=mha):
        mha(x, x, x)  # self: not selected
    assert built == [] and [r.captured for r in tap.store] == [False]
    with torch.no_grad(), combined_patch(tap, model=mha):
        mha(x, mem, mem)
    assert built == [1] and tap.store[-1].probs.shape == (1, 5, 3)
