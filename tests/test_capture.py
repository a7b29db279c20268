"""Kernel shims: exact probabilities against a float64 eager reference, outputs untouched."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aiba import AibaError, AttnTap, combined_patch
from aiba.capture.patch import flash_attn_inputs
from aiba.capture.probs import AttnInputs, head_mean_probs
from conftest import SdpaAttention

# held in a container: combined_patch rebinds every module global bound to the original
_KERNEL = {"sdpa": F.scaled_dot_product_attention}


def ORIG_SDPA(*args, **kwargs):
    return _KERNEL["sdpa"](*args, **kwargs)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-3}


def _tap(**kw):
    return AttnTap(kinds=("cross", "self"), keep="probs", **kw)


def _sdpa_case(seed: int):
    """A random SDPA call: shapes, mask form, causal, GQA, scale, dtype drawn per seed."""
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    dtype = DTYPES[seed % 3]
    b, hk, lq, lk, e = r(1, 3), r(1, 3), r(1, 37), r(1, 29), r(2, 16)
    gqa = seed % 4 == 1
    h = hk * (r(2, 3) if gqa else 1)
    causal = seed % 5 == 2
    three_d = seed % 7 == 3 and not gqa
    mask_kind = ["none", "bool2d", "bool4d", "float4d", "float_bcast"][seed % 5] if not causal else "none"
    q = torch.randn(b, h, lq, e, generator=g).to(dtype)
    k = torch.randn(b, hk, lk, e, generator=g).to(dtype)
    v = torch.randn(b, hk, lk, e, generator=g).to(dtype)
    mask = None
    if mask_kind == "bool2d":
        mask = torch.rand(lq, lk, generator=g) > 0.3
    elif mask_kind == "bool4d":
        mask = torch.rand(b, 1, lq, lk, generator=g) > 0.4
        mask[..., 0, :] = False  # a fully masked row
    elif mask_kind == "float4d":
        mask = (torch.randn(b, h, lq, lk, generator=g) * 2).to(dtype)
    elif mask_kind == "float_bcast":
        mask = torch.where(torch.rand(1, lk, generator=g) > 0.5, 0.0, -10000.0).to(dtype)  # padding-style bias
    scale = 0.3 if seed % 6 == 5 else None
    if three_d:
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
        if mask is not None and mask.dim() == 4:
            mask = mask[:, 0]
    kwargs = dict(attn_mask=mask, is_causal=causal, scale=scale)
    if gqa:
        kwargs["enable_gqa"] = True
    return q, k, v, kwargs, dtype


@pytest.mark.parametrize("seed", range(60))
def test_sdpa_probs_exact_and_output_untouched(seed, ref_probs):
    q, k, v, kw, dtype = _sdpa_case(seed)
    try:
        expected = ORIG_SDPA(q, k, v, **kw)
    except RuntimeError as e:  # a combination this CPU build has no kernel for
        pytest.skip(f"unsupported by the CPU kernel: {e}")
    tap = _tap()
    with combined_patch(tap):
        out = F.scaled_dot_product_attention(q, k, v, **kw)
    assert torch.equal(out, expected) or (torch.isnan(expected).any() and torch.equal(out.nan_to_num(), expected.nan_to_num()))
    assert len(tap.store) == 1
    rec = tap.store[0]
    q4, k4 = (q, k) if q.dim() == 4 else (q[:, None], k[:, None])
    mask = kw["attn_mask"]
    if mask is not None and q.dim() == 3 and mask.dim() == 3:
        mask = mask[:, None]
    ref = ref_probs(q4, k4, mask, "top_left" if kw["is_causal"] else None, kw["scale"])
    assert rec.probs.dtype == torch.float32 and rec.probs.device.type == "cpu"
    assert rec.probs.shape == (q4.shape[0], q4.shape[2], k4.shape[2])
    assert not torch.isnan(rec.probs).any()
    err = (rec.probs.double() - ref).abs().max().item()
    assert err < TOL[dtype], f"max abs error {err} for seed {seed}"
    assert (rec.q_len, rec.k_len, rec.heads, rec.batch) == (q4.shape[2], k4.shape[2], q4.shape[1], q4.shape[0])


def test_fully_masked_rows_are_zero_not_nan():
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[1] = False
    tap = _tap()
    with combined_patch(tap):
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    p = tap.store[0].probs
    assert torch.equal(p[0, 1], torch.zeros(5))
    torch.testing.assert_close(p[0, [0, 2, 3]].sum(-1), torch.ones(3))


def test_dropout_not_applied_to_record_and_rng_untouched(ref_probs):
    q, k, v = torch.randn(2, 2, 6, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    torch.manual_seed(3)
    expected = ORIG_SDPA(q, k, v, dropout_p=0.5)
    tap = _tap()
    torch.manual_seed(3)
    with combined_patch(tap):
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert torch.equal(out, expected)
    assert (tap.store[0].probs.double() - ref_probs(q, k)).abs().max() < 1e-6


def test_module_bound_sdpa_is_rebound_and_restored():
    fake = types.ModuleType("aiba_test_user_module")
    fake.sdpa = F.scaled_dot_product_attention
    fake.attention = F.scaled_dot_product_attention
    sys.modules[fake.__name__] = fake
    try:
        tap = _tap()
        q = torch.randn(1, 1, 4, 8)
        with combined_patch(tap):
            assert fake.sdpa is not _KERNEL["sdpa"] and fake.attention is not _KERNEL["sdpa"]
            fake.sdpa(q, q, q)
            fake.attention(q, q, q)
        assert len(tap.store) == 2
        assert fake.sdpa is _KERNEL["sdpa"] and fake.attention is _KERNEL["sdpa"]
    finally:
        del sys.modules[fake.__name__]


def test_backward_through_patched_sdpa_matches():
    q = torch.randn(1, 2, 5, 8, requires_grad=True)
    k = torch.randn(1, 2, 3, 8, requires_grad=True)
    v = torch.randn(1, 2, 3, 8, requires_grad=True)
    ORIG_SDPA(q, k, v).sum().backward()
    g_ref = q.grad.clone()
    q.grad = None
    with combined_patch(_tap()):
        F.scaled_dot_product_attention(q, k, v).sum().backward()
    assert torch.equal(q.grad, g_ref)


# ---------------------------------------------------------------------- MHA
MHA_CASES = [
    # (kwargs for nn.MultiheadAttention, call kind, extras)
    (dict(batch_first=True), "self", {}),  # fast path in eval + no_grad
    (dict(batch_first=True), "cross", {}),
    (dict(batch_first=False), "cross", {"kpm": True}),
    (dict(batch_first=True, kdim=6, vdim=10), "cross", {"kpm": True}),
    (dict(batch_first=True), "self", {"attn_mask": "bool"}),
    (dict(batch_first=True), "cross", {"attn_mask": "float3d"}),
    (dict(batch_first=False, add_bias_kv=True), "cross", {"kpm": True, "attn_mask": "bool"}),
    (dict(batch_first=True, add_zero_attn=True), "self", {"kpm": True}),
    (dict(batch_first=True, bias=False), "cross", {}),
    (dict(batch_first=True), "unbatched", {}),
]


@pytest.mark.parametrize("case", range(len(MHA_CASES)))
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("train", [False, True])
def test_mha_weights_match_need_weights(case, need_weights, train):
    cfg, kind, extra = MHA_CASES[case]
    torch.manual_seed(case)
    e, h, n, lq, lk = 16, 4, 3, 7, 5
    mod = nn.MultiheadAttention(e, h, **cfg)
    mod.train(train)
    bf = cfg.get("batch_first", False)
    shape = lambda L, d=e: (n, L, d) if bf else (L, n, d)
    if kind == "unbatched":
        x = torch.randn(lq, e)
        query = key = value = x
        lk_ = lq
    elif kind == "self":
        query = key = value = torch.randn(shape(lq))
        lk_ = lq
    else:
        query = torch.randn(shape(lq))
        key = torch.randn(shape(lk, cfg.get("kdim", e)))
        value = torch.randn(shape(lk, cfg.get("vdim", e)))
        lk_ = lk
    kw = {}
    if extra.get("kpm"):
        kpm = torch.zeros(n, lk_, dtype=torch.bool)
        kpm[0, -2:] = True
        kw["key_padding_mask"] = kpm
    if extra.get("attn_mask") == "bool":
        am = torch.zeros(lq, lk_, dtype=torch.bool)
        am[:, 0] = True
        kw["attn_mask"] = am
    elif extra.get("attn_mask") == "float3d":
        kw["attn_mask"] = torch.randn(n * h, lq, lk_)
    with torch.no_grad():
        # dropout is 0, so train mode is deterministic; eval + no_grad + batch_first + self takes the fast path
        _, w_ref = mod(query, key, value, need_weights=True, average_attn_weights=True, **kw)
        expected = mod(query, key, value, need_weights=need_weights, **kw)
        tap = AttnTap(kinds=("cross", "self"), keep="probs")
        with combined_patch(tap, model=mod):
            out = mod(query, key, value, need_weights=need_weights, **kw)
    for a, b in zip(out, expected):
        assert (a is None and b is None) or torch.equal(a, b)
    assert len(tap.store) == 1, [r.kernel for r in tap.store]
    rec = tap.store[0]
    assert rec.kernel == "mha" and rec.kind == ("cross" if kind == "cross" else "self")
    w = w_ref if w_ref.dim() == 3 else w_ref[None]
    got = rec.probs
    torch.testing.assert_close(got, w.nan_to_num(0.0), atol=1e-5, rtol=0)


def test_mha_inside_transformer_layer_recorded_once():
    layer = nn.TransformerDecoderLayer(16, 4, dim_feedforward=32, batch_first=True, dropout=0.0).eval()
    x, mem = torch.randn(2, 6, 16), torch.randn(2, 9, 16)
    with torch.no_grad():
        expected = layer(x, mem)
        tap = AttnTap(kinds=("cross", "self"))
        with combined_patch(tap, model=layer):
            out = layer(x, mem)
    assert torch.equal(out, expected)
    assert [(r.name, r.kind, r.kernel) for r in tap.store] == [
        ("self_attn", "self", "mha"),
        ("multihead_attn", "cross", "mha"),
    ]


# --------------------------------------------------------------- flash_attn
def _flash_reference(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), **_):
    """A CPU stand-in implementing flash_attn_func's documented semantics (B, S, H, D)."""
    qh, kh, vh = (t.transpose(1, 2).float() for t in (q, k, v))
    if kh.shape[1] != qh.shape[1]:
        rep = qh.shape[1] // kh.shape[1]
        kh, vh = kh.repeat_interleave(rep, 1), vh.repeat_interleave(rep, 1)
    lq, lk = qh.shape[2], kh.shape[2]
    i = torch.arange(lq)[:, None] + lk - lq
    j = torch.arange(lk)[None, :]
    allowed = torch.ones(lq, lk, dtype=torch.bool)
    if causal:
        allowed &= j <= i
    if window_size[0] >= 0:
        allowed &= j >= i - window_size[0]
    if window_size[1] >= 0:
        allowed &= j <= i + window_size[1]
    return ORIG_SDPA(qh, kh, vh, attn_mask=allowed, scale=softmax_scale).transpose(1, 2).to(q.dtype)


_FLASH = {"ref": _flash_reference}  # a container: module globals bound to the kernel are rebound


@pytest.fixture
def fake_flash_attn(monkeypatch):
    """A ``flash_attn`` package and a stable-audio-tools-like module that bound its function."""
    fa = types.ModuleType("flash_attn")
    fa.flash_attn_func = _flash_reference
    user = types.ModuleType("aiba_test_sat_like")
    user.flash_attn_func = fa.flash_attn_func  # `from flash_attn import flash_attn_func` at import
    monkeypatch.setitem(sys.modules, "flash_attn", fa)
    monkeypatch.setitem(sys.modules, "aiba_test_sat_like", user)
    return fa, user


@pytest.mark.parametrize("causal,window,lq,lk,hk", [
    (False, (-1, -1), 7, 11, 4),
    (True, (-1, -1), 5, 9, 4),  # bottom-right causal with Lq < Lk
    (True, (-1, -1), 8, 8, 2),  # grouped kv heads
    (False, (2, 1), 9, 9, 4),  # local window
])
def test_flash_attn_shim_and_module_binding(fake_flash_attn, ref_probs, causal, window, lq, lk, hk):
    fa, user = fake_flash_attn
    g = torch.Generator().manual_seed(lq * lk)
    q, k, v = torch.randn(2, lq, 4, 8, generator=g), torch.randn(2, lk, hk, 8, generator=g), torch.randn(2, lk, hk, 8, generator=g)
    expected = _flash_reference(q, k, v, causal=causal, window_size=window)
    tap = _tap()
    with combined_patch(tap):
        assert user.flash_attn_func is not _FLASH["ref"] and fa.flash_attn_func is not _FLASH["ref"]
        out = user.flash_attn_func(q, k, v, causal=causal, window_size=list(window))
    assert user.flash_attn_func is _FLASH["ref"] and fa.flash_attn_func is _FLASH["ref"]
    assert torch.equal(out, expected)
    (rec,) = tap.store
    assert rec.kernel == "flash_attn"
    ref = ref_probs(q.transpose(1, 2), k.transpose(1, 2), None, "bottom_right" if causal else None, None, window)
    assert (rec.probs.double() - ref).abs().max() < 1e-5


def test_flash_alibi_and_softcap_inputs(ref_probs):
    q, k = torch.randn(1, 5, 2, 8), torch.randn(1, 6, 2, 8)
    slopes = torch.tensor([0.5, 0.25])
    x = flash_attn_inputs(q, k, k, alibi_slopes=slopes, softcap=3.0)
    i = torch.arange(5)[:, None] + 1
    j = torch.arange(6)[None, :]
    bias = -slopes[None, :, None, None].double() * (i - j).abs().double()
    # alibi is added after soft-capping in FlashAttention
    ref = ref_probs(q.transpose(1, 2), k.transpose(1, 2), bias, None, None, (-1, -1), 3.0)
    assert (head_mean_probs(x).double() - ref).abs().max() < 1e-5


# ------------------------------------------------------------ tagging & names
class _Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn1, self.attn2 = SdpaAttention(), SdpaAttention()

    def forward(self, x, text):
        return self.attn2(self.attn1(x), context=text)


def test_module_context_decides_kind_and_names_paths():
    m = _Plain()
    x, text = torch.randn(2, 6, 16), torch.randn(2, 6, 16)  # equal lengths: the heuristic would say "self"
    tap = AttnTap(kinds=("cross", "self"))
    with combined_patch(tap, model=m):
        m(x, text)
    assert [(r.name, r.kind, r.kind_source) for r in tap.store] == [
        ("attn1", "self", "args"),
        ("attn2", "cross", "args"),
    ]


def test_cross_ratio_heuristic_and_kernel_names():
    q = torch.randn(1, 2, 64, 8)
    tap = AttnTap(kinds=("cross", "self"), cross_ratio=0.5)
    with combined_patch(tap):
        F.scaled_dot_product_attention(q, torch.randn(1, 2, 32, 8), torch.randn(1, 2, 32, 8))  # 32 <= 0.5 * 64
        F.scaled_dot_product_attention(q, torch.randn(1, 2, 33, 8), torch.randn(1, 2, 33, 8))  # 33 > 32
        F.scaled_dot_product_attention(q, torch.randn(1, 2, 128, 8), torch.randn(1, 2, 128, 8))  # 64 <= 64
        tap.next_step()
        F.scaled_dot_product_attention(q, q, q)
    assert [(r.name, r.kind, r.kind_source, r.step) for r in tap.store] == [
        ("sdpa.0", "cross", "heuristic", 0),
        ("sdpa.1", "self", "heuristic", 0),
        ("sdpa.2", "cross", "heuristic", 0),
        ("sdpa.0", "self", "heuristic", 1),
    ]
    assert AttnTap(cross_ratio=0.0).heuristic_kind(10, 3) == "self"
    assert AttnTap(cross_ratio=1.0).heuristic_kind(10, 10) == "cross"


def test_selection_filters_skip_recompute():
    m = _Plain()
    x, text = torch.randn(1, 6, 16), torch.randn(1, 4, 16)
    tap = AttnTap(kinds=("cross",), keep="probs", steps=(1, 2))
    with combined_patch(tap, model=m):
        for _ in range(3):
            m(x, text)
            tap.next_step()
    captured = [(r.name, r.step) for r in tap.store if r.captured]
    assert captured == [("attn2", 1)]
    assert all(r.probs is None for r in tap.store if not r.captured)
    assert len(tap.store) == 6
    tap2 = AttnTap(kinds=("cross", "self"), layers="attn1", keep="probs")
    with combined_patch(tap2, model=m):
        m(x, text)
    assert [(r.name, r.captured, r.probs is not None) for r in tap2.store] == [("attn1", True, True), ("attn2", False, False)]
    tap2.reset()
    assert tap2.store == [] and tap2.step == 0


def test_diffusers_attention_tagged_by_encoder_states():
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention

    attn1 = Attention(query_dim=16, heads=2, dim_head=8)
    attn2 = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8)
    x, enc = torch.randn(2, 10, 16), torch.randn(2, 10, 12)
    holder = nn.ModuleDict({"attn1": attn1, "attn2": attn2})
    with torch.no_grad():
        e1, e2 = attn1(x), attn2(x, encoder_hidden_states=enc)
        tap = AttnTap(kinds=("cross", "self"), keep="probs")
        with combined_patch(tap, model=holder):
            o1, o2 = attn1(x), attn2(x, encoder_hidden_states=enc)
    assert torch.equal(o1, e1) and torch.equal(o2, e2)
    assert [(r.name, r.kind, r.kind_source) for r in tap.store] == [("attn1", "self", "args"), ("attn2", "cross", "args")]


def test_bad_inputs_raise_aiba_error():
    with pytest.raises(AibaError, match="pool"):
        AttnTap(pool="median")
    with pytest.raises(AibaError, match="kinds"):
        AttnTap(kinds=("crosss",))
    with pytest.raises(AibaError, match="cross_ratio"):
        AttnTap(cross_ratio=2)
    with pytest.raises(AibaError, match="AttnTap"):
        with combined_patch(object()):
            pass
    with pytest.raises(AibaError, match=r"query heads \(3\) a multiple of key heads \(2\)"):
        AttnInputs(torch.randn(1, 3, 4, 8), torch.randn(1, 2, 4, 8))
