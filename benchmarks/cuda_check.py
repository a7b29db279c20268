"""Correctness of the kernel shims on a CUDA machine (the part CPU tests cannot reach).

For every SDPA backend PyTorch offers on the device (flash, memory-efficient, cuDNN, math),
each dtype, with and without masks / causal / grouped heads, and for xformers and
flash_attn when they import and run: the captured output must be bit-identical to the
unpatched call and the recorded probabilities must match a float64 eager reference.

    python benchmarks/cuda_check.py [--out DIR]     # prints a table, writes cuda_check.json

Installs nothing; runs on the CPU too (math backend only), which checks the script itself.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from aiba import AttnTap, combined_patch

_KERNEL = {"sdpa": F.scaled_dot_product_attention}  # a container: combined_patch rebinds module globals
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-3}


def reference(q, k, mask=None, causal=None):
    """float64 head-mean probabilities (B, Lq, Lk); causal "top_left" | "bottom_right"."""
    q, k = q.double(), k.double()
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    lq, lk = s.shape[-2:]
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    if causal:
        off = lk - lq if causal == "bottom_right" else 0
        allowed = torch.arange(lk, device=q.device)[None] <= torch.arange(lq, device=q.device)[:, None] + off
        s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0).mean(1)


def sdpa_cases(device):
    g = torch.Generator(device="cpu").manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for name, (b, h, hk, lq, lk, e), mask, causal in [
            ("cross", (2, 8, 8, 1024, 77, 64), None, False),
            ("self-causal", (2, 8, 8, 256, 256, 64), None, True),
            ("gqa", (2, 24, 12, 1025, 130, 64), None, False),
            ("pad-bias", (2, 8, 8, 512, 128, 64), "bias", False),
        ]:
            q = torch.randn(b, h, lq, e, generator=g).to(device, dtype)
            k = torch.randn(b, hk, lk, e, generator=g).to(device, dtype)
            v = torch.randn(b, hk, lk, e, generator=g).to(device, dtype)
            m = None
            if mask == "bias":
                m = torch.zeros(b, 1, 1, lk, device=device, dtype=dtype)
                m[:, :, :, lk // 2:] = -10000.0  # padding, as AudioLDM2's T5 stream
            yield f"{name}/{str(dtype)[6:]}", q, k, v, m, causal, dtype


def check_sdpa(device):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.MATH]
    if device == "cuda":
        backends += [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    rows = []
    for be in backends:
        for name, q, k, v, m, causal, dtype in sdpa_cases(device):
            kw = dict(attn_mask=m, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])
            row = dict(kernel=f"sdpa:{be.name.lower()}", case=name)
            try:
                with sdpa_kernel(be):
                    expected = _KERNEL["sdpa"](q, k, v, **kw)
                    tap = AttnTap(kinds=("cross", "self"), keep="probs")
                    with combined_patch(tap):
                        out = F.scaled_dot_product_attention(q, k, v, **kw)
            except RuntimeError as e:  # this backend does not take this case
                rows.append(dict(row, status="n/a", note=_note(e)))
                continue
            err = (tap.store[0].probs.double() - reference(q, k, m, "top_left" if causal else None).cpu()).abs().max().item()
            ok = torch.equal(out, expected) and err < TOL[dtype]
            rows.append(dict(row, status="ok" if ok else "FAIL", identical=torch.equal(out, expected), max_err=err))
    return rows


def _note(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:120]


def _check_bshd(kernel: str, case: str, fn, q, k, v, causal: str | None, **kw) -> dict:
    """One (B, S, H, D) kernel call: captured output identical, probabilities exact."""
    try:
        expected = fn(q, k, v, **kw)
        tap = AttnTap(kinds=("cross", "self"), keep="probs")
        with combined_patch(tap):
            out = fn(q, k, v, **kw)
    except Exception as e:  # no operator for this device / build
        return dict(kernel=kernel, case=case, status="n/a", note=_note(e))
    ref = reference(q.transpose(1, 2), k.transpose(1, 2), None, causal)
    err = (tap.store[0].probs.double() - ref.cpu()).abs().max().item()
    same = torch.equal(out, expected)
    return dict(kernel=kernel, case=case, status="ok" if same and err < 2e-3 else "FAIL", identical=same, max_err=err)


def _bshd(g, device, lq, lk, h, hk):
    q = torch.randn(2, lq, h, 64, generator=g).to(device, torch.float16)
    k = torch.randn(2, lk, hk, 64, generator=g).to(device, torch.float16)
    return q, k, torch.randn_like(k)


def check_xformers(device):
    try:
        import xformers.ops as xo
        from xformers.ops.fmha.attn_bias import LowerTriangularMask
    except Exception as e:  # not installed, or built for another torch
        return [dict(kernel="xformers", case="import", status="n/a", note=_note(e))]
    g = torch.Generator(device="cpu").manual_seed(1)
    return [
        _check_bshd("xformers", "cross", xo.memory_efficient_attention, *_bshd(g, device, 1024, 77, 8, 8), None),
        _check_bshd("xformers", "causal", xo.memory_efficient_attention, *_bshd(g, device, 256, 256, 8, 8), "top_left",
                    attn_bias=LowerTriangularMask()),
    ]


def check_flash_attn(device):
    try:
        import flash_attn
    except Exception as e:
        return [dict(kernel="flash_attn", case="import", status="n/a", note=_note(e))]
    g = torch.Generator(device="cpu").manual_seed(2)
    fn = flash_attn.flash_attn_func
    return [
        _check_bshd("flash_attn", "cross", fn, *_bshd(g, device, 1025, 130, 8, 8), None),
        _check_bshd("flash_attn", "causal-br", fn, *_bshd(g, device, 200, 300, 8, 8), "bottom_right", causal=True),
        _check_bshd("flash_attn", "gqa", fn, *_bshd(g, device, 512, 512, 8, 4), None),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for cuda_check.json")
    a = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.time()
    info = dict(torch=torch.__version__, device=torch.cuda.get_device_name(0) if device == "cuda" else "cpu")
    rows = check_sdpa(device) + check_xformers(device) + check_flash_attn(device)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "cuda_check.json"), "w") as f:
        json.dump(dict(info=info, seconds=time.time() - t0, rows=rows), f, indent=1)
    print(json.dumps(info))
    print(f"{'kernel':22} {'case':20} {'status':6} {'identical':9} {'max_err':>9}  note")
    for r in rows:
        err = f"{r['max_err']:.2e}" if "max_err" in r else ""
        print(f"{r['kernel']:22} {r['case']:20} {r['status']:6} {str(r.get('identical', '')):9} {err:>9}  {r.get('note', '')}")
    failed = [r for r in rows if r["status"] == "FAIL"]
    print(f"{len(rows) - len(failed)} ok or n/a, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
