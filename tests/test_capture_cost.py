"""What a captured call costs: ATen ops launched, recompute memory against the budget, and the
maps of the fused recompute (head mean + pooling + fold in one matmul) against float64."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from aiba import AibaWarning, AttnTap, combined_patch
from aiba.capture.probs import AttnInputs, head_mean_chunks

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-3}
# ops that launch no kernel: allocations and metadata-only results
_NO_KERNEL = {"aten.empty.memory_format", "aten.empty_strided.default", "aten.detach.default",
              "aten.lift_fresh.default", "aten._unsafe_view.default"}


class OpLog(TorchDispatchMode):
    """Every ATen op that launches a kernel (views, allocations and aliases left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and str(func) not in _NO_KERNEL:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages allocated inside the mode while they are referenced."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage address -> [bytes, tensors holding it]
        self.held: set[int] = set()
        self.now = self.peak = 0

    def _drop(self, key: int, tid: int) -> None:
        self.held.discard(tid)
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                del self.live[key]
                self.now -= entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or id(t) in self.held:
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            entry = self.live.get(key)
            if entry is None:
                if key in inputs or st.nbytes() == 0:  # written in place / a view of an input
                    continue
                entry = self.live[key] = [st.nbytes(), 0]
                self.now += st.nbytes()
                self.peak = max(self.peak, self.now)
            entry[1] += 1
            self.held.add(id(t))
            weakref.finalize(t, self._drop, key, id(t))
        return out


def _diffusers_layout(b, h, n, e, dtype, gen):
    """(B, H, N, E) as diffusers hands it to SDPA: a transposed view of (B, N, H, E)."""
    return torch.randn(b, n, h, e, generator=gen).to(dtype).transpose(1, 2)


# ------------------------------------------------------------------------- op count
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", ["cond", "all"])
def test_captured_cross_call_launches_at_most_five_ops(dtype, batch):
    """A selected cross call with pool="mean" on a latent lattice, steady state (second step):
    one baddbmm (scale included), one in-place softmax, one addmm_/baddbmm_ (head mean +
    pooling + fold into the layer's sum); half inputs add their float32 copies of q and k, a batch whose heads cannot be
    merged without a copy (diffusers' layout at batch 2) adds the copies instead."""
    g = torch.Generator().manual_seed(0)
    q = _diffusers_layout(2, 4, 64, 16, dtype, g)
    k = _diffusers_layout(2, 4, 10, 16, dtype, g)
    tap = AttnTap(8, 8, pool="mean", latent_shape=(8, 8), cfg_order="uncond_first", batch=batch, content=list(range(6)))

    def call():
        return F.scaled_dot_product_attention(q, k, k)

    with OpLog() as plain:
        call()
    with combined_patch(tap):
        call()
        tap.next_step()
        with OpLog() as captured:
            call()
    assert [r.captured for r in tap.store] == [True, True]
    extra = list(captured.ops)
    for op in plain.ops:
        extra.remove(op)
    limit = 3 if dtype == torch.float32 and batch == "cond" else 5
    assert len(extra) <= limit, f"{len(extra)} ops over plain SDPA (limit {limit}): {extra}"
    assert "aten.softmax.int_out" in extra and {"aten.addmm_.default", "aten.baddbmm_.default"} & set(extra), extra


def test_not_selected_call_launches_no_op():
    q, k = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    tap = AttnTap(kinds=("cross",), latent_shape=(4, 4))
    with OpLog() as plain:
        F.scaled_dot_product_attention(q, k, k)
    with combined_patch(tap), OpLog() as captured:
        F.scaled_dot_product_attention(q, k, k)
    assert tap.store[0].kind == "self" and not tap.store[0].captured
    assert captured.ops == plain.ops


# ------------------------------------------------------------ exactness of the fused path
def _reference_map(ref_probs, q, k, mask, w, p, lattice, target, kind):
    """float64: head-mean probabilities -> pooled (cross) or received (self) -> lattice -> grid."""
    a = ref_probs(q, k, mask)  # (B, Lq, Lk) float64
    if kind == "cross":
        values = (a @ w.double().reshape(-1, 1)).squeeze(-1)[:, p:]  # (B, N)
    else:
        values = a.mean(dim=1)[:, p:]  # (B, N): mean attention each key receives
    grid = values.reshape(-1, 1, *lattice)
    return F.interpolate(grid, size=target, mode="bilinear", align_corners=False)[:, 0]


CASES = [  # (kind, b, h, hk, lq, lk, e, prefix, mask, budget)
    ("cross", 1, 4, 4, 64, 10, 16, 0, None, 64 << 20),
    ("cross", 2, 4, 4, 66, 10, 16, 2, None, 64 << 20),
    ("cross", 2, 6, 2, 64, 12, 8, 0, None, 64 << 20),  # grouped key heads
    ("cross", 2, 4, 4, 64, 10, 16, 0, None, 4000),  # many chunks
    ("cross", 2, 6, 3, 67, 9, 8, 3, None, 3000),  # chunks straddle the prefix, grouped heads
    ("cross", 2, 4, 4, 64, 10, 16, 0, "bool", 5000),  # padding mask, some rows fully masked
    ("cross", 2, 4, 4, 64, 10, 16, 0, "float", 64 << 20),
    ("self", 2, 4, 4, 64, 64, 16, 0, None, 64 << 20),
    ("self", 2, 4, 2, 66, 66, 16, 2, None, 9000),  # chunks, prefix keys, grouped heads
    ("self", 1, 2, 2, 64, 64, 8, 0, "bool", 6000),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_fused_maps_match_float64_reference(case, dtype, ref_probs):
    kind, b, h, hk, lq, lk, e, p, mask_kind, budget = case
    g = torch.Generator().manual_seed(CASES.index(case))
    q = _diffusers_layout(b, h, lq, e, dtype, g)
    k = _diffusers_layout(b, hk, lk, e, dtype, g)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(b, 1, lq, lk, generator=g) > 0.3
        mask[:, :, 5] = False  # a fully masked query row: zeros, not NaN
    elif mask_kind == "float":
        mask = (torch.randn(b, h, lq, lk, generator=g) * 2).to(dtype)
    content = [1, 2, 4, 5, 7]
    lattice = (8, 8)
    target = (12, 10)
    tap = AttnTap(*target, pool="mean", kinds=(kind,), latent_shape=lattice, prefix_tokens=p, content=content,
                  budget_bytes=budget)
    with combined_patch(tap):
        for _ in range(2):  # two steps: the second one is the cached steady state
            F.scaled_dot_product_attention(q, k, k, attn_mask=mask, enable_gqa=hk != h)
            tap.next_step()
    assert [r.captured for r in tap.store] == [True, True] and tap.store[0].kind == kind
    w = torch.zeros(lk)
    w[content] = 1.0 / len(content)
    expect = _reference_map(ref_probs, q, k, mask, w, p, lattice, target, kind)
    got = tap.maps().overall
    assert torch.isfinite(got).all()
    err = (got.double() - expect).abs().max().item()
    assert err < TOL[dtype], f"max error {err:.2e} vs float64 (tolerance {TOL[dtype]:.0e})"


@pytest.mark.parametrize("pool", ["mean", "max", None])
def test_fused_fold_equals_per_call_grids(pool):
    """The fused fold (no per-call grids) and the per-call grid path give the same maps, with
    late step weighting, prefix tokens and many chunks."""
    g = torch.Generator().manual_seed(3)
    kw = dict(pool=pool, latent_shape=(4, 8), prefix_tokens=1, content=[0, 2, 3], weights="late", gamma=0.7,
              budget_bytes=2000)
    fused, grids = AttnTap(8, 16, **kw), AttnTap(8, 16, keep="calls", **kw)
    with combined_patch(fused, grids):
        for _ in range(3):
            q, k = torch.randn(2, 4, 33, 8, generator=g), torch.randn(2, 4, 6, 8, generator=g)
            F.scaled_dot_product_attention(q, k, k)
            fused.next_step()
            grids.next_step()
    torch.testing.assert_close(fused.maps().overall, grids.maps().overall, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- NaN / inf input
def test_nonfinite_inputs_warn_once_per_layer_and_maps_are_produced():
    q, k = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 4, 8)
    bad = q.clone()
    bad[0, 1, 3, 2] = float("nan")
    tap = AttnTap(4, 4, latent_shape=(4, 4), content=[0, 1])
    for step in range(2):
        tap.on_call("sdpa", "good", "cross", "module", AttnInputs(q, k))
        tap.on_call("sdpa", "bad", "cross", "module", AttnInputs(bad, k))
        tap.on_call("sdpa", "inf", "cross", "module", AttnInputs(q, k.clone().index_fill_(2, torch.tensor([1]), float("inf"))))
        tap.next_step()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        maps = tap.maps()
        tap.maps()  # read again: no second warning
    msgs = [str(w.message) for w in caught if issubclass(w.category, AibaWarning)]
    assert len(msgs) == 2 and any("'bad'" in m for m in msgs) and any("'inf'" in m for m in msgs), msgs
    assert torch.isfinite(maps.layers["good"]).all()
    assert not torch.isfinite(maps.layers["bad"]).all() and torch.isfinite(maps.layers["bad"]).any()


# ------------------------------------------------------------------------------- memory
MEM_SHAPES = {  # name -> (b, h, lq, lk, e): the full (B, H, Lq, Lk) block is 4.8-8x the budget
    "self": (2, 4, 1024, 1024, 16),
    "cross": (2, 8, 4096, 77, 64),
}


@pytest.mark.parametrize("shape", sorted(MEM_SHAPES))
@pytest.mark.parametrize("what", ["cross-mean", "cross-max", "self", "probs-chunks", "half"])
def test_recompute_tensor_bytes_within_budget(shape, what):
    """Peak bytes of the tensors a recompute allocates (every live storage, counted by a
    dispatch mode) stay within 1.05 x budget_bytes, and the chunks use most of it."""
    b, h, lq, lk, e = MEM_SHAPES[shape]
    budget = 4 << 20
    g = torch.Generator().manual_seed(0)
    dtype = torch.float16 if what == "half" else torch.float32
    x = AttnInputs(_diffusers_layout(b, h, lq, e, dtype, g), _diffusers_layout(b, h, lk, e, dtype, g))
    assert b * h * lq * lk * 4 >= 4.5 * budget  # one block would not fit
    if what == "probs-chunks":
        with LiveBytes() as m:
            for _, _, a in head_mean_chunks(x, budget):
                a.amax(-1)
    else:
        kind = "self" if what == "self" else "cross"
        tap = AttnTap(pool="max" if what == "cross-max" else "mean", kinds=(kind,), budget_bytes=budget,
                      latent_shape=(lq if kind == "cross" else lk,), content=list(range(5)))
        tap.on_call("sdpa", "L", kind, "module", x)  # the layer's sum and weights exist from here on
        with LiveBytes() as m:
            tap.on_call("sdpa", "L", kind, "module", x)
    assert m.peak <= 1.05 * budget, f"{m.peak / budget:.3f} x budget"
    assert m.peak >= 0.5 * budget, f"chunks use only {m.peak / budget:.3f} x budget"


_RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from aiba import AttnTap
    from aiba.capture.probs import AttnInputs
    torch.set_num_threads(1)

    def status(key):
        for ln in open("/proc/self/status"):
            if ln.startswith(key):
                return int(ln.split()[1]) * 1024

    kind, dtype, b, h, lq, lk, e, budget = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:9])
    torch.manual_seed(0)
    q = torch.randn(b, lq, h, e).to(getattr(torch, dtype)).transpose(1, 2)  # diffusers' layout
    k = torch.randn(b, lk, h, e).to(getattr(torch, dtype)).transpose(1, 2)
    x = AttnInputs(q, k)
    tap = AttnTap(pool="mean", kinds=(kind,), latent_shape=(lq if kind == "cross" else lk,), budget_bytes=budget,
                  content=list(range(5)))
    tap.on_call("sdpa", "L", kind, "module", x)  # warm: kernels, the layer's sum, the weights
    open("/proc/self/clear_refs", "w").write("5")  # peak RSS (VmHWM) := current RSS
    base = status("VmRSS:")
    tap.on_call("sdpa", "L", kind, "module", x)
    print(json.dumps({"extra": status("VmHWM:") - base, "budget": budget, "naive": b * h * lq * lk * 4}))
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc/self/clear_refs")
@pytest.mark.parametrize("args", [("self", "float32", 2, 8, 2048, 2048, 16), ("cross", "float32", 2, 8, 16384, 77, 64),
                                  ("cross", "float16", 2, 8, 16384, 77, 64)], ids=["self", "cross", "cross-half"])
def test_recompute_peak_rss_within_budget(args):
    """Peak resident memory of one captured call in a fresh process, above the RSS before it,
    within 1.05 x budget_bytes (every large block mmapped and unmapped on free, so RSS tracks
    the live buffers)."""
    budget = 16 << 20
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, *map(str, args), str(budget)], capture_output=True,
                         text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    m = json.loads(res.stdout.strip().splitlines()[-1])
    assert m["naive"] >= 4.5 * m["budget"]
    assert m["extra"] <= 1.05 * m["budget"], f"{m['extra'] / m['budget']:.3f} x budget"


# ------------------------------------------------------------- per-layer plan, lazy sizes
def _pooled_lattice_map(ref_probs, q, k, w, lattice):
    """float64: the conditional item's head-mean probabilities pooled by ``w``, on the lattice."""
    a = ref_probs(q[1:], k[1:], None)  # (1, Lq, Lk)
    return (a @ w.double().reshape(-1, 1)).reshape(1, *lattice)


def test_layer_plan_follows_setting_changes_and_reset(ref_probs):
    """The per-layer plan of the common cross call (lattice, sum, pooling vector) is dropped
    when a setting changes and on reset: the second call pools with the new content tokens,
    and after reset the sums start from zero (a stale plan would fold into the old sums)."""
    g = torch.Generator().manual_seed(5)
    q, k = _diffusers_layout(2, 4, 32, 8, torch.float32, g), _diffusers_layout(2, 4, 6, 8, torch.float32, g)
    tap = AttnTap(8, 4, latent_shape=(8, 4), cfg_order="uncond_first", content=[0, 1])
    wa, wb = torch.tensor([0.5, 0.5, 0, 0, 0, 0]), torch.tensor([0, 0, 0, 1 / 3, 1 / 3, 1 / 3])
    with combined_patch(tap):  # one call per step: each is layer "sdpa.0"
        F.scaled_dot_product_attention(q, k, k)
        tap.next_step()
        F.scaled_dot_product_attention(q, k, k)  # steady state: the plan is used
        tap.next_step()
        tap.content = [3, 4, 5]
        F.scaled_dot_product_attention(q, k, k)
    expect = (2 * _pooled_lattice_map(ref_probs, q, k, wa, (8, 4)) + _pooled_lattice_map(ref_probs, q, k, wb, (8, 4))) / 3
    torch.testing.assert_close(tap.maps().layers["sdpa.0"].double(), expect, rtol=0, atol=1e-6)  # grid = lattice
    tap.reset()
    with combined_patch(tap):
        F.scaled_dot_product_attention(q, k, k)
    maps = tap.maps()
    assert maps.calls == 1
    torch.testing.assert_close(maps.layers["sdpa.0"].double(), _pooled_lattice_map(ref_probs, q, k, wb, (8, 4)),
                               rtol=0, atol=1e-6)


def test_layer_plan_is_not_used_for_a_masked_call(ref_probs):
    """A call of the same layer with a mask takes the general
    path: its map is still exact."""
    g = torch.Generator().manual_seed(6)
    q, k = _diffusers_layout(2, 4, 32, 8, torch.float32, g), _diffusers_layout(2, 4, 6, 8, torch.float32, g)
    mask = torch.tensor([[True, True, True, True, False, False]])  # (1, Lk): the last two keys masked out
    tap = AttnTap(8, 4, latent_shape=(8, 4), cfg_order="uncond_first", content=[0, 1, 2, 3], kinds=("cross",))
    w = torch.tensor([0.25] * 4 + [0, 0])
    with combined_patch(tap):
        F.scaled_dot_product_attention(q, k, k)
        tap.next_step()
        F.scaled_dot_product_attention(q, k, k, attn_mask=mask)
    a0 = _pooled_lattice_map(ref_probs, q, k, w, (8, 4))
    a1 = _pooled_lattice_map(lambda q_, k_, m: ref_probs(q_, k_, mask), q, k, w, (8, 4))
    assert not torch.allclose(a0, a1)
    torch.testing.assert_close(tap.maps().layers["sdpa.0"].double(), (a0 + a1) / 2, rtol=0, atol=1e-6)


def test_self_call_kind_and_unkept_call_never_read_the_sizes():
    """A module's context argument decides "self" without the call's sizes, and a call a
    ``records="selected"`` tap keeps nothing of is only counted: no record, no sizes."""
    from aiba.capture.patch import module_kind

    class Attn(torch.nn.Module):
        def forward(self, x, encoder_hidden_states=None):
            return F.scaled_dot_product_attention(x, x, x)

    def no_sizes():
        raise AssertionError("sizes were read")

    m = Attn()
    assert module_kind(m, (torch.zeros(1),), {}, no_sizes) == ("self", "args", None)
    tap = AttnTap(records="selected", kinds=("cross",))
    assert tap.record_call("sdpa", "attn", "self", "args", no_sizes) is None
    assert tap.counts == {"attn": 1} and tap.store == []
    net = torch.nn.ModuleDict({"attn": m})
    with combined_patch(tap, model=net):
        for _ in range(3):
            net["attn"](torch.randn(1, 2, 5, 4))
    assert tap.counts == {"attn": 4} and tap.store == []
