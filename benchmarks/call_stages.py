"""Where a captured call's host time goes, stage by stage (CPU, one thread).

The per-call harness of ``per_call.py`` (a diffusers ``Attention`` -> processor -> SDPA at a
tiny shape) runs 3,000 calls per case; each stage of aiba's call path is wrapped with
``profile_capture.StageTimer`` (only inside this script) and the median of the last 2,700 calls is
printed. Nested stages include their children and each wrapper's own ~0.1-0.5 us.

    python benchmarks/call_stages.py
"""

from __future__ import annotations

import contextlib
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from aiba import AttnTap, combined_patch  # noqa: E402
from aiba.capture import patch, tap as tapmod  # noqa: E402
from aiba.tools import bench  # noqa: E402
from profile_capture import StageTimer  # noqa: E402  the same stage wrapper, per call here

STAGES = [(patch, "_dispatch", "everything after the kernel returned"), (patch, "_issuer", "finding the issuing module"),
          (patch, "module_kind", "the kind from the module's arguments"), (tapmod.AttnTap, "record_call", "the record"),
          (tapmod.AttnTap, "capture_call", "recompute, pool, fold"), (tapmod, "fold_pooled_item", "its three kernels")]


def main(calls: int = 3000) -> dict:
    torch.set_num_threads(1)
    model, _ = bench.per_call_modules(torch.device("cpu"), torch.float32, bench.PER_CALL_SHAPE)
    x, ctx = torch.randn(2, 64, 64), torch.randn(2, 10, 32)
    common = dict(kinds=("cross",), latent_shape=(8, 8), content=list(range(6)), cfg_order="uncond_first")
    cases = {"not selected (self call), recorded": (AttnTap(**common), lambda: model["attn1"](x)),
             "not selected, records=\"selected\"": (AttnTap(records="selected", **common), lambda: model["attn1"](x)),
             "selected cross, pool=\"mean\"": (AttnTap(pool="mean", **common),
                                             lambda: model["attn2"](x, encoder_hidden_states=ctx))}
    out = {}
    for case, (tap, fn) in cases.items():
        timer = StageTimer()
        with torch.no_grad(), combined_patch(tap, model=model), contextlib.ExitStack() as stack:
            for owner, attr, label in STAGES:
                stack.enter_context(timer.wrap(owner, attr, label))
            for _ in range(calls):
                fn()
        out[case] = {label: statistics.median(ms for _, ms in timer.ms[label][calls // 10:]) * 1e3
                     for _, _, label in STAGES if len(timer.ms[label]) > calls // 10}
        print(case)
        for label, us in out[case].items():
            print(f"  {label:40s} {us:7.2f} us")
    return out


if __name__ == "__main__":
    main()
