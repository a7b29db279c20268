"""Scoped patching: every symbol restored after exit, exception, half-failed entry, nesting."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aiba.capture.patch as patch_mod
from aiba import AttnTap, combined_patch
from aiba.capture.patch import active_taps, patched_symbols

# containers, so combined_patch's rebinding of module globals does not touch the references
ORIG = {"sdpa": F.scaled_dot_product_attention, "mha": vars(nn.MultiheadAttention)["forward"]}


def _is_original():
    return F.scaled_dot_product_attention is ORIG["sdpa"] and vars(nn.MultiheadAttention)["forward"] is ORIG["mha"]


def _call():
    q = torch.randn(1, 2, 4, 8)
    return F.scaled_dot_product_attention(q, q, q)


def test_symbols_swapped_inside_and_restored_after():
    assert _is_original() and patched_symbols() == [] and active_taps() == ()
    tap = AttnTap(kinds=("self",))
    with combined_patch(tap) as t:
        assert t is tap
        assert F.scaled_dot_product_attention is not ORIG["sdpa"]
        assert vars(nn.MultiheadAttention)["forward"] is not ORIG["mha"]
        assert (F, "scaled_dot_product_attention") in patched_symbols()
        assert active_taps() == (tap,)
        _call()
    assert _is_original() and patched_symbols() == [] and active_taps() == ()
    _call()
    assert len(tap.store) == 1  # nothing recorded outside the block


def test_restored_after_exception_inside():
    tap = AttnTap(kinds=("self",))
    with pytest.raises(ValueError, match="boom"):
        with combined_patch(tap):
            _call()
            raise ValueError("boom")
    assert _is_original() and patched_symbols() == [] and active_taps() == ()
    assert len(tap.store) == 1


class _Refuses:
    """An owner whose attribute cannot be set: entering fails on it."""

    def __setattr__(self, name, value):
        raise RuntimeError(f"cannot patch {name}")


def test_half_failed_entry_undoes_applied_patches(monkeypatch):
    real_targets = patch_mod._targets
    owner = _Refuses()
    object.__setattr__(owner, "kernel", "original")

    def targets():
        out = real_targets()
        out.insert(len(out) // 2, patch_mod._Target(owner, "kernel", "shim"))  # fails midway
        return out

    monkeypatch.setattr(patch_mod, "_targets", targets)
    with pytest.raises(RuntimeError, match="cannot patch kernel"):
        with combined_patch(AttnTap()):
            pytest.fail("the block must not run")
    assert _is_original() and patched_symbols() == [] and active_taps() == ()
    assert patch_mod._PATCHED["depth"] == 0


def test_restore_deletes_attributes_that_were_not_there():
    class Owner:
        pass

    class Child(Owner):
        pass

    Owner.f = "base"
    with patch_mod._swap(patch_mod._Target(Child, "f", "patched")):
        assert Child.f == "patched" and Owner.f == "base"
    assert "f" not in vars(Child) and Child.f == "base"


def test_nested_taps_both_see_calls_and_restore_once():
    outer, inner = AttnTap(kinds=("self",)), AttnTap(kinds=("self",))
    with combined_patch(outer):
        _call()
        with combined_patch(inner):
            shim = F.scaled_dot_product_attention
            _call()
            assert active_taps() == (outer, inner)
        assert F.scaled_dot_product_attention is shim  # still patched for the outer block
        assert active_taps() == (outer,)
        _call()
    assert _is_original()
    assert len(outer.store) == 3 and len(inner.store) == 1


def test_two_taps_in_one_block_and_model_names_restored():
    m = nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=True))
    a, b = AttnTap(kinds=("self",)), AttnTap(kinds=("self",))
    x = torch.randn(1, 3, 8)
    with combined_patch(a, b, model=m) as taps:
        assert taps == (a, b)
        m[0](x, x, x)
    assert [r.name for r in a.store] == ["0"] and [r.name for r in b.store] == ["0"]
    assert a.model_paths == {} and b.model_paths == {}


def test_outputs_bit_identical_on_a_model():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    x = torch.randn(2, 10, 16)
    expected = layer(x)
    with combined_patch(AttnTap(kinds=("cross", "self"), keep="probs")):
        out = layer(x)
    assert torch.equal(out, expected)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc/self/clear_refs")
def test_recompute_memory_stays_near_budget():
    """Peak resident memory of the recompute, measured in a fresh process, vs the budget."""
    script = textwrap.dedent(
        """
        import torch, json
        from aiba.capture.probs import AttnInputs, head_mean_chunks

        def status(key):
            for ln in open("/proc/self/status"):
                if ln.startswith(key):
                    return int(ln.split()[1]) * 1024

        torch.manual_seed(0)
        b, h, lq, lk, e = 1, 8, 16384, 2048, 16
        q, k = torch.randn(b, h, lq, e), torch.randn(b, h, lk, e)
        budget = 16 << 20
        out = torch.empty(b, lq)          # a pooled result, as the tap keeps
        for s, t, a in head_mean_chunks(AttnInputs(q[:, :, :2048], k), budget):
            pass                           # warm the allocator and kernels at the chunk size
        open("/proc/self/clear_refs", "w").write("5")  # peak RSS (VmHWM) := current RSS
        base = status("VmRSS:")
        for s, t, a in head_mean_chunks(AttnInputs(q, k), budget):
            out[:, s:t] = a.amax(-1)
        print(json.dumps({"extra": status("VmHWM:") - base, "budget": budget, "naive": b * h * lq * lk * 4}))
        """
    )
    # every large block mmapped and unmapped on free, so peak RSS tracks the live tensors
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    import json

    m = json.loads(res.stdout.strip().splitlines()[-1])
    assert m["naive"] >= 60 * m["budget"]  # the full matrix would be 1 GiB
    # every temporary (the probability block, the head mean) is sized by the budget
    assert m["extra"] <= 1.05 * m["budget"], m


def test_same_tap_nested_records_each_call_once():
    tap = AttnTap(kinds=("self",), keep="probs")
    with combined_patch(tap):
        with combined_patch(tap):
            assert active_taps() == (tap,)
            _call()
        _call()
    assert len(tap.store) == 2 and [r.index for r in tap.store] == [0, 1]


def test_module_imported_inside_the_block_gets_the_original_back():
    import types

    name = "aiba_test_late_import"
    with combined_patch(AttnTap()):
        late = types.ModuleType(name)
        late.sdpa = F.scaled_dot_product_attention  # `from torch.nn.functional import ...` while patched
        sys.modules[name] = late
        assert late.sdpa is not ORIG["sdpa"]
    try:
        assert late.sdpa is ORIG["sdpa"]
    finally:
        del sys.modules[name]
