"""Joint (MM-DiT) attention: SD3 and Flux calls tagged "joint" with the context span, the
cross map from latent-query rows over context keys (renormalised over those keys), the
latent block for self maps; against a float64 computation from the kernel's own inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aiba import AttnTap, combined_patch

pytest.importorskip("diffusers")

_SDPA = {"f": F.scaled_dot_product_attention}


@pytest.fixture
def kernel_inputs(monkeypatch):
    """Record what reaches F.scaled_dot_product_attention (outside any aiba block)."""
    seen = []

    def spy(query, key, value, attn_mask=None, **kw):
        seen.append((query.detach().clone(), key.detach().clone(), None if attn_mask is None else attn_mask.clone()))
        return _SDPA["f"](query, key, value, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return seen, monkeypatch


def _block_probs(q, k, rows, cols, mask=None):
    """Float64 softmax of query rows over key cols only, head-averaged: (B, rows, cols)."""
    s = q.double()[:, :, rows] @ k.double()[:, :, cols].transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        s = s + mask.double()[..., rows, cols]
    return torch.softmax(s, dim=-1).mean(dim=1)


def _sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                 pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16).eval()


def _sd3_inputs():
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(2, 5, 16, generator=g),
                pooled_projections=torch.randn(2, 8, generator=g), timestep=torch.tensor([10.0, 10.0]))


def _flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8,
                                  axes_dims_rope=(2, 2, 4)).eval()


def _flux_inputs():
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(2, 16, 4, generator=g), encoder_hidden_states=torch.randn(2, 5, 16, generator=g),
                pooled_projections=torch.randn(2, 8, generator=g), timestep=torch.tensor([0.5, 0.5]),
                img_ids=torch.randn(16, 3, generator=g), txt_ids=torch.zeros(5, 3))


@pytest.mark.parametrize("which", ["sd3", "flux"])
def test_joint_calls_exact_cross_and_self_blocks(which, kernel_inputs):
    model, inputs = (_sd3(), _sd3_inputs()) if which == "sd3" else (_flux(), _flux_inputs())
    with torch.no_grad():
        expected = model(**inputs).sample
    refs, mp = kernel_inputs
    mp.undo()  # the spy is gone before aiba patches
    n, m = 16, 5  # latent tokens (8x8 / patch 2, or 16 packed), context tokens
    # diffusers' processors: SD3 concatenates [latent, context], Flux [context, latent]
    lat, ctx = (slice(0, n), slice(n, n + m)) if which == "sd3" else (slice(m, m + n), slice(0, m))
    # keep="calls" with pool=None: each call's cross/self block, per key, on the 16-cell lattice
    kw = dict(keep=("probs", "calls"), pool=None, latent_shape=(4, 4), target_T=4, target_F=4, lattices=[(4, 4)])
    cross = AttnTap(kinds=("cross",), **kw)
    self_ = AttnTap(kinds=("self",), **kw)
    with torch.no_grad(), combined_patch(cross, self_, model=model):
        out = model(**inputs).sample
    assert torch.equal(out, expected)
    names = ["transformer_blocks.0.attn", "transformer_blocks.1.attn"] if which == "sd3" else \
        ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    assert [(r.name, r.kind, r.kind_source, r.context, r.q_len) for r in cross.store] == [
        (nm, "joint", "args", (ctx.start, ctx.stop), n + m) for nm in names]
    assert len(refs) == len(cross.store) == len(self_.store)
    full = slice(0, n + m)
    for (q, k, mask), rc, rs in zip(refs, cross.store, self_.store):
        # the record keeps the whole call's probabilities
        assert rc.probs.shape == (2, n + m, n + m)
        assert (rc.probs.double() - _block_probs(q, k, full, full, mask)).abs().max() < 1e-6
        # the cross map: latent rows over the context keys, renormalised over those keys
        ref_c = _block_probs(q, k, lat, ctx, mask)  # (B, n, m)
        assert rc.lattice == (4, 4) and rc.grid.shape == (2, m, 4, 4)
        assert (rc.grid.double() - ref_c.transpose(1, 2).reshape(2, m, 4, 4)).abs().max() < 1e-6
        # the self map: attention each latent cell receives within the latent block
        ref_s = _block_probs(q, k, lat, lat, mask).mean(dim=1)  # (B, n)
        assert rs.grid.shape == (2, 4, 4)
        assert (rs.grid.double() - ref_s.reshape(2, 4, 4)).abs().max() < 1e-6
    assert sorted(self_.maps().layers) == [nm + ":self" for nm in sorted(names)]


class _PlantedJoint:
    """An explicit SD3-style joint processor ([latent, context] in one call) that plants
    attention of latent token ``i`` on context token ``j`` through an additive mask."""

    def __init__(self, i, j, n, m):
        self.i, self.j, self.n, self.m = i, j, n, m

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **_):
        b, h = hidden_states.shape[0], attn.heads
        split = lambda t: t.view(b, -1, h, t.shape[-1] // h).transpose(1, 2)  # (B, H, L, hd)
        q = torch.cat([split(attn.to_q(hidden_states)), split(attn.add_q_proj(encoder_hidden_states))], dim=2)
        k = torch.cat([split(attn.to_k(hidden_states)), split(attn.add_k_proj(encoder_hidden_states))], dim=2)
        v = torch.cat([split(attn.to_v(hidden_states)), split(attn.add_v_proj(encoder_hidden_states))], dim=2)
        bias = torch.zeros(self.n + self.m, self.n + self.m)
        bias[self.i, self.n + self.j] = 30.0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(b, -1, h * q.shape[-1])
        o_lat, o_ctx = o[:, : self.n], o[:, self.n :]
        return (attn.to_out[0](o_lat), attn.to_add_out(o_ctx)) if not attn.context_pre_only else attn.to_out[0](o_lat)


def test_planted_joint_attention_lands_on_its_cell():
    model = _sd3()
    n, m, i, j = 16, 5, 9, 3  # latent token 9 = row 2, column 1 of the 4 x 4 patch lattice
    for blk in model.transformer_blocks:
        blk.attn.set_processor(_PlantedJoint(i, j, n, m))
    tap = AttnTap(target_T=4, target_F=4, pool="subset", tokens=[j], latent_shape=(4, 4), lattices=[(4, 4)])
    with torch.no_grad(), combined_patch(tap, model=model):
        model(**_sd3_inputs())
    assert [r.kind for r in tap.store] == ["joint", "joint"]
    grid = tap.maps().overall  # (B, 4, 4)
    for b in range(2):
        flat = grid[b].flatten()
        assert int(flat.argmax()) == i and flat[i] > 0.99


def test_added_kv_keys_joint_exact(kernel_inputs):
    """diffusers' added-KV processors: latent queries over [context; latent] keys. The cross
    map is the queries over the context keys only (renormalised), the self map over the
    latent keys."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 16), layers_per_block=1,
        down_block_types=("SimpleCrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "SimpleCrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8).eval()
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 6, 16, generator=g)
    with torch.no_grad():
        expected = unet(x, torch.tensor([3]), encoder_hidden_states=ctx).sample
    refs, mp = kernel_inputs
    mp.undo()
    kw = dict(keep=("probs", "calls"), pool=None, latent_shape=(8, 8), target_T=8, target_F=8)
    cross, self_ = AttnTap(kinds=("cross",), **kw), AttnTap(kinds=("self",), **kw)
    with torch.no_grad(), combined_patch(cross, self_, model=unet):
        out = unet(x, torch.tensor([3]), encoder_hidden_states=ctx).sample
    assert torch.equal(out, expected)
    assert [(r.kind, r.context, r.k_len - r.q_len) for r in cross.store] == [("joint", (0, 6), 6)] * 4
    assert len(refs) == 4
    for (q, k, mask), rc, rs in zip(refs, cross.store, self_.store):
        lq, lk = q.shape[2], k.shape[2]
        rows, full = slice(0, lq), slice(0, lk)
        assert (rc.probs.double() - _block_probs(q, k, rows, full, mask)).abs().max() < 1e-6
        t = f = int(lq ** 0.5)
        ref_c = _block_probs(q, k, rows, slice(0, 6), mask)  # (B, Lq, 6)
        assert (rc.grid.double() - torch.nn.functional.interpolate(
            ref_c.transpose(1, 2).reshape(2, 6, t, f), size=(8, 8), mode="bilinear", align_corners=False)).abs().max() < 1e-6
        ref_s = _block_probs(q, k, rows, slice(6, lk), mask).mean(dim=1).reshape(2, 1, t, f)  # received per latent key
        assert (rs.grid.double() - torch.nn.functional.interpolate(ref_s, size=(8, 8), mode="bilinear",
                                                                  align_corners=False)[:, 0]).abs().max() < 1e-6
