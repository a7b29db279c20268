"""Host microseconds per attention call: what aiba adds to one module -> processor -> SDPA call.

One run, one torch thread on the CPU, interleaved blocks (the order rotates every repetition),
paired differences against plain SDPA of the same repetition, two clocks: the median of single
calls timed at their call site (what the table leads with: robust to preemption on a shared
machine) and the block's thread CPU time per call:

- the shim alone: a self call inside ``combined_patch`` with a tap that takes no SDPA call
  (the kernel called through aiba's shim, nothing else: the floor of every call);
- not selected: a self call under ``AttnTap(kinds=("cross",))`` (recorded, not recomputed), and
  the same with ``records="selected"`` (only counted);
- selected cross, pooled: ``AttnTap(pool="mean", latent_shape=(8, 8), content=..., cfg_order=...)``
  at a tiny shape (batch 2 = a CFG pair, 4 heads of 16, 64 queries, 10 keys), mapped and
  folded into the layer's sum;
- its kernels alone: the three kernels a selected call launches, called directly from the
  processor (the floor of the selected call: what is left above it is the capture's Python);
- hand-written recompute: a processor that recomputes the same pooled probabilities itself.

Also counts the ATen ops a selected call adds (views and allocations left out). Prints the
table and writes ``per-call-<device>-<date>[-label].json`` (every raw time) under ``--out``.

    python benchmarks/per_call.py                     # CPU, 1 thread
    python benchmarks/per_call.py --src /path/to/other/checkout/src --label before
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _count_ops(dtype) -> list[str]:
    """ATen ops one selected cross call adds over plain SDPA (steady state)."""
    import torch
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode

    from aiba import AttnTap, combined_patch

    skip = {"aten.empty.memory_format", "aten.empty_strided.default", "aten.detach.default", "aten.lift_fresh.default",
            "aten._unsafe_view.default"}

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and str(func) not in skip:
                self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    q = torch.randn(2, 64, 4, 16).to(dtype).transpose(1, 2)  # diffusers' layout (B, H, N, d)
    k = torch.randn(2, 10, 4, 16).to(dtype).transpose(1, 2)
    tap = AttnTap(pool="mean", latent_shape=(8, 8), cfg_order="uncond_first", content=list(range(6)))
    with Log() as plain:
        F.scaled_dot_product_attention(q, k, k)
    with combined_patch(tap):
        F.scaled_dot_product_attention(q, k, k)
        tap.next_step()
        with Log() as cap:
            F.scaled_dot_product_attention(q, k, k)
    extra = list(cap.ops)
    for op in plain.ops:
        extra.remove(op)
    return extra


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--calls", type=int, default=200, help="calls per timed block")
    ap.add_argument("--reps", type=int, default=21, help="interleaved repetitions")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--src", default=str(ROOT / "src"), help="the aiba source to measure (default: this checkout)")
    ap.add_argument("--label", default="", help="suffix of the JSON name (e.g. before, after)")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args(argv)
    sys.path.insert(0, a.src)
    import torch

    from aiba.tools import bench
    from aiba.atomic import atomic_write

    torch.set_num_threads(a.threads)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    pc = bench.per_call(a.device, torch.float32, calls=a.calls, reps=a.reps, log=log)
    pc["src"] = a.src
    pc["ops"] = {str(dt).replace("torch.", ""): _count_ops(dt) for dt in (torch.float32, torch.float16)}
    try:
        pc["loadavg"] = os.getloadavg()
    except OSError:
        pass
    labels = {"the shim alone": "the shim alone (a tap that takes no SDPA call: the floor of any call)",
              "not selected": "not selected (a self call with kinds=(\"cross\",)), recorded",
              "not selected, records=selected": "not selected, records=\"selected\" (counted only)",
              "selected cross pooled": "selected cross call, pool=\"mean\", 8x8 latent lattice, tiny shape",
              "its kernels alone": "the kernels that call launches, called directly (its floor)",
              "hand-written recompute": "a hand-written processor that recomputes the same probabilities"}
    print(f"{pc['module']}, {pc['device']}, {pc['threads']} thread, {pc['calls']} calls x {pc['reps']} "
          f"interleaved repetitions; load average {pc.get('loadavg', '?')}")
    for title, us, ov in (("median call at its call site (perf_counter_ns)", pc["in_call_us"], pc["in_call_overhead_us"]),
                          ("thread CPU time of the block / calls", pc["us"], pc["overhead_us"])):
        print(f"\n{title}\n| per attention call (module -> processor -> SDPA) | median | IQR | min |")
        print("|---|---|---|---|")
        r = us["plain-cross"]
        print(f"| plain SDPA call, cross | {r['median']:.1f} us | {r['q1']:.1f} .. {r['q3']:.1f} | {r['min']:.1f} |")
        for line, label in labels.items():
            if line not in ov:
                continue  # older code measured with --src: a case it did not have
            r = ov[line]
            print(f"| {label} | {r['median']:+.1f} us | {r['q1']:+.1f} .. {r['q3']:+.1f} | {r['min']:+.1f} |")
    for dt, ops in pc["ops"].items():
        print(f"ATen ops a selected cross call adds ({dt}): {len(ops)}: {', '.join(o.replace('aten.', '') for o in ops)}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"per-call-{torch.device(a.device).type}-{datetime.date.today().isoformat()}{'-' + a.label if a.label else ''}.json"
    atomic_write(out / name, json.dumps(pc, indent=1))
    log(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
