"""torch.compile inside the block: the compiled model runs its eager original, outputs are
identical to the uncompiled run under the same block, each call recorded once with real
tensors and concrete sizes, named by module path."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aiba import AttnTap, combined_patch
from aiba.errors import AibaWarning
from conftest import SdpaAttention


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn1, self.attn2 = SdpaAttention(), SdpaAttention()
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x, text):
        x = x + self.attn1(x)
        x = x + self.attn2(x, context=text)
        return x + self.mha(x, text, text, need_weights=False)[0]


def _run(model, x, text, tap):
    with torch.no_grad(), combined_patch(tap, model=model):
        return model(x, text)


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
@pytest.mark.parametrize("warm", [False, True])
def test_compiled_model_captured_once_with_real_tensors(backend, warm):
    if backend == "inductor" and not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("inductor on CPU needs a C++ compiler")
    torch._dynamo.reset()  # cold cache
    torch.manual_seed(0)
    model = _Model().eval()
    x, text = torch.randn(2, 8, 16), torch.randn(2, 5, 16)
    ref_tap = AttnTap(kinds=("cross", "self"), keep="probs")
    expected = _run(model, x, text, ref_tap)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    if warm:
        with torch.no_grad():
            compiled(x, text)  # compiled before the block
    tap = AttnTap(kinds=("cross", "self"), keep="probs")
    with warnings.catch_warnings():
        warnings.simplefilter("error", category=AibaWarning)  # no "calls not captured" warning
        out = _run(compiled, x, text, tap)
    assert torch.equal(out, expected)
    got = [(r.name, r.kind, r.q_len, r.k_len, r.outside) for r in tap.store]
    assert got == [(r.name, r.kind, r.q_len, r.k_len, r.outside) for r in ref_tap.store]
    assert [r.name for r in tap.store] == ["attn1", "attn2", "mha"]
    for r, e in zip(tap.store, ref_tap.store):
        assert type(r.probs) is torch.Tensor and isinstance(r.k_len, int) and isinstance(r.q_len, int)
        assert torch.equal(r.probs, e.probs)
    # after the block the compiled model runs compiled again, unchanged
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, text), model(x, text))


def test_traced_calls_are_counted_and_warned_once():
    """A stance set inside the block lets Dynamo trace the shim: it passes through, the
    model runs unchanged, and aiba warns with the number of calls it could not see."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _Model().eval()
    x, text = torch.randn(2, 8, 16), torch.randn(2, 5, 16)
    with torch.no_grad():
        expected = model(x, text)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    tap = AttnTap(kinds=("cross", "self"), keep="probs")
    with pytest.warns(Warning, match="not captured"), torch.no_grad(), combined_patch(tap, model=model):
        with torch.compiler.set_stance("default"):
            out = compiled(x, text)
    torch.testing.assert_close(out, expected)
    assert all(type(r.probs) is torch.Tensor for r in tap.store)


def test_compile_after_a_first_block_in_a_fresh_process():
    """A program whose first ``combined_patch`` block also first imports Dynamo can still
    ``torch.compile`` SDPA afterwards (Dynamo must never record a shim in place of SDPA)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys, torch, torch.nn.functional as F
        from aiba import AttnTap, combined_patch
        assert "torch._dynamo" not in sys.modules
        q = torch.randn(1, 2, 4, 8)
        with combined_patch(AttnTap()):
            F.scaled_dot_product_attention(q, q, q)
        f = torch.compile(lambda t: F.scaled_dot_product_attention(t, t, t), backend="eager", fullgraph=True)
        assert torch.equal(f(q), F.scaled_dot_product_attention(q, q, q))
        print("compiled")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "compiled", r.stderr[-2000:]
