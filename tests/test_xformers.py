"""xformers shim: layouts and AttentionBias classes against a dense reference.

xformers' kernels need CUDA; its Python parts (layouts, bias classes, ``materialize``) run
anywhere, so everything but the call-through is checked here (the call-through runs in
``benchmarks/cuda_check.py`` on a CUDA machine).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aiba import AttnTap, combined_patch
from aiba.capture.patch import xformers_inputs
from aiba.capture.probs import head_mean_probs

xformers = pytest.importorskip("xformers.ops", reason="xformers not installed")

_KERNEL = {"sdpa": F.scaled_dot_product_attention}  # a container: combined_patch rebinds module globals


def ORIG_SDPA(*args, **kwargs):
    return _KERNEL["sdpa"](*args, **kwargs)


def _tap(**kw):
    return AttnTap(kinds=("cross", "self"), keep="probs", **kw)


def _xf_reference(q, k, attn_bias, scale, ref_probs):
    """Dense reference: BMHK -> BHMK with the bias materialised by xformers itself."""
    from xformers.ops.fmha.attn_bias import AttentionBias

    if q.dim() == 3:
        q4, k4 = q[:, :, None], k[:, :, None]
    elif q.dim() == 5:
        q4, k4 = q.flatten(2, 3), k.flatten(2, 3)
    else:
        q4, k4 = q, k
    q4, k4 = q4.transpose(1, 2), k4.transpose(1, 2)
    b, h, m, _ = q4.shape
    bias = attn_bias
    if isinstance(bias, AttentionBias):
        shape = (b, q.shape[2], q.shape[3], m, k4.shape[2]) if q.dim() == 5 else (b, h, m, k4.shape[2])
        bias = bias.materialize(shape, dtype=torch.float64)
        bias = bias.flatten(1, 2) if q.dim() == 5 else bias
    elif bias is not None and q.dim() == 3:
        bias = bias[:, None]
    return ref_probs(q4, k4, bias, None, scale)


def _xf_cases():
    from xformers.ops.fmha import attn_bias as ab

    yield "BMHK", (2, 9, 3, 8), (2, 6, 3, 8), None
    yield "BMK", (3, 7, 8), (3, 5, 8), None
    yield "BMGHK", (2, 6, 2, 3, 8), (2, 6, 2, 3, 8), ab.LowerTriangularMask()
    yield "BMHK-lowertri", (1, 8, 2, 8), (1, 8, 2, 8), ab.LowerTriangularMask()
    yield "BMHK-tensor", (2, 5, 2, 8), (2, 7, 2, 8), "tensor"
    yield "BMHK-blockdiag", (1, 7, 2, 8), (1, 7, 2, 8), ab.BlockDiagonalMask.from_seqlens([3, 4])
    yield "BMHK-blockdiag-causal", (1, 7, 2, 8), (1, 7, 2, 8), ab.BlockDiagonalCausalMask.from_seqlens([4, 3])


@pytest.mark.parametrize("case", list(range(7)))
def test_xformers_layouts_and_biases(case, ref_probs):
    name, qs, ks, bias = list(_xf_cases())[case]
    g = torch.Generator().manual_seed(case)
    q, k = torch.randn(qs, generator=g), torch.randn(ks, generator=g)
    if bias == "tensor":
        bias = torch.randn(qs[0], qs[2], qs[1], ks[1], generator=g)
    x = xformers_inputs(q, k, k, attn_bias=bias, scale=0.4)
    got = head_mean_probs(x)
    ref = _xf_reference(q, k, bias, 0.4, ref_probs)
    assert (got.double() - ref).abs().max() < 1e-5, name


def test_xformers_symbols_patched_restored_and_dispatched(monkeypatch, ref_probs):
    import xformers.ops as xo
    from xformers.ops import fmha

    orig = xo.memory_efficient_attention

    def cpu_reference(query, key, value, attn_bias=None, p=0.0, scale=None, **_):
        # a CPU stand-in for the CUDA-only kernel: the dense BMHK computation
        qh, kh, vh = (t.transpose(1, 2) for t in (query, key, value))
        return ORIG_SDPA(qh, kh, vh, attn_mask=attn_bias, scale=scale).transpose(1, 2)

    monkeypatch.setattr(xo, "memory_efficient_attention", cpu_reference)
    monkeypatch.setattr(fmha, "memory_efficient_attention", cpu_reference)
    q, k, v = torch.randn(2, 9, 3, 8), torch.randn(2, 4, 3, 8), torch.randn(2, 4, 3, 8)
    expected = cpu_reference(q, k, v)
    tap = _tap()
    with combined_patch(tap):
        assert xo.memory_efficient_attention is not cpu_reference
        assert fmha.memory_efficient_attention is not cpu_reference
        out = xo.memory_efficient_attention(q, k, v)
        fmha.memory_efficient_attention(q, k, v)
    assert xo.memory_efficient_attention is cpu_reference and fmha.memory_efficient_attention is cpu_reference
    assert torch.equal(out, expected)
    assert [r.kernel for r in tap.store] == ["xformers", "xformers"]
    ref = ref_probs(q.transpose(1, 2), k.transpose(1, 2))
    assert (tap.store[0].probs.double() - ref).abs().max() < 1e-5
    assert orig is not None


def test_xformers_call_through_raises_kernel_error_unchanged():
    """On the CPU xformers has no operator: the shim must surface the kernel's own error."""
    import xformers.ops as xo

    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(NotImplementedError):
        xo.memory_efficient_attention(q, q, q)
    tap = _tap()
    with combined_patch(tap), pytest.raises(NotImplementedError):
        xo.memory_efficient_attention(q, q, q)
    assert tap.store == []
