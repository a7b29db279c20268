"""Where the capture time goes: aiba-cross (or aiba-all) against the uncaptured forward.

Times each stage of the capture path per forward by wrapping the functions it calls (only
inside this script): the lookup of the issuing module (``_issuer``),
building the canonical inputs (``_sdpa_inputs``), the probability recompute
(``prob_chunks``: baddbmm + in-place softmax per chunk; ``fold_pooled_item``: the common cross
call, recompute + head mean + pooling + fold in three kernels), lattice search (``find_lattice``), bilinear resize (``resize``) and the fold into the
per-layer sums (``_fold``). What remains of the overhead is per-call Python bookkeeping
(contextvars, dispatch, records, selection). Also prints torch.profiler's top ops.

    python benchmarks/profile_capture.py --backend audioldm2 --mode aiba-cross
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


class StageTimer:
    def __init__(self) -> None:
        self.ms = defaultdict(list)  # stage -> [(forward index, ms of one call or chunk)]
        self.fwd = 0
        self.sync = lambda: None

    def wrap(self, owner, attr: str, stage: str, generator: bool = False):
        orig = getattr(owner, attr)
        timer = self

        if generator:
            def wrapped(*a, **k):
                it = orig(*a, **k)
                while True:
                    t0 = time.perf_counter()
                    try:
                        item = next(it)
                    except StopIteration:
                        return
                    timer.sync()
                    timer.ms[stage].append((timer.fwd, (time.perf_counter() - t0) * 1e3))  # one chunk
                    yield item
        else:
            def wrapped(*a, **k):
                t0 = time.perf_counter()
                out = orig(*a, **k)
                timer.sync()
                timer.ms[stage].append((timer.fwd, (time.perf_counter() - t0) * 1e3))
                return out

        self.ms.setdefault(stage, [])  # listed even when never reached (e.g. bound into a closure)
        return _patch(owner, attr, wrapped)

    def wrap_on_call(self, cls):
        """tap.on_call, split by whether the call was captured (recomputed and mapped)."""
        orig = cls.on_call
        timer = self

        def wrapped(*a, **k):
            t0 = time.perf_counter()
            rec = orig(*a, **k)
            timer.sync()
            which = "captured" if rec is not None and rec.captured else "not captured"
            timer.ms[f"on_call total ({which})"].append((timer.fwd, (time.perf_counter() - t0) * 1e3))
            return rec

        return _patch(cls, "on_call", wrapped)


def _patch(owner, attr, value):
    from aiba.capture.patch import swap_attr  # aiba is importable once main() set sys.path

    return swap_attr(owner, attr, value)


def main(argv=None) -> int:
    import torch

    from aiba.tools import bench
    from aiba.maps import mapping
    from aiba.capture import patch, tap as tapmod

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="audioldm2", choices=bench.BENCH_BACKENDS)
    ap.add_argument("--size", default="default", choices=bench.SIZES)
    ap.add_argument("--model", default=None, help="model name when the backend builds several (default: the last)")
    ap.add_argument("--mode", default="aiba-cross", choices=("aiba-cross", "aiba-all"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--top", type=int, default=12, help="rows of torch.profiler's table (0: none)")
    a = ap.parse_args(argv)

    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = bench.BenchConfig(backend=a.backend, size=a.size, device=a.device, modes=("none", a.mode))
    models = bench.build_models(cfg)
    model = next(m for m in models if m.name == a.model) if a.model else models[-1]
    dev = torch.device(a.device)
    none, cap = bench.Mode("none", model, cfg), bench.Mode(a.mode, model, cfg)
    timer = StageTimer()
    if dev.type == "cuda":
        timer.sync = lambda: torch.cuda.synchronize(dev)

    with torch.no_grad():
        for _ in range(2):
            bench.timed_forward(none, dev), bench.timed_forward(cap, dev)
        t_none, t_cap = [], []
        for _ in range(a.reps):
            t_none.append(bench.timed_forward(none, dev))
            t_cap.append(bench.timed_forward(cap, dev))
        # staged run (the wrappers add a little time of their own)
        with contextlib.ExitStack() as st:
            st.enter_context(timer.wrap(patch, "_issuer", "issuing module (_issuer)"))
            st.enter_context(timer.wrap(patch, "_sdpa_inputs", "canonical inputs (_sdpa_inputs)"))
            st.enter_context(timer.wrap(tapmod, "prob_chunks", "recompute, chunked (baddbmm+softmax)", generator=True))
            st.enter_context(timer.wrap(tapmod, "fold_pooled_item", "recompute+pool+fold, one item (3 kernels)"))
            st.enter_context(timer.wrap(mapping, "find_lattice", "lattice search"))
            st.enter_context(timer.wrap(mapping, "resize", "bilinear resize"))
            st.enter_context(timer.wrap(tapmod.AttnTap, "_fold", "fold into layer sums"))
            st.enter_context(timer.wrap_on_call(tapmod.AttnTap))
            t_staged = []
            for i in range(a.reps):
                timer.fwd = i
                t_staged.append(bench.timed_forward(cap, dev))
        calls = sum(1 for r in cap.tap.store) if cap.tap.store else None
        enter = bench.enter_ms(cap, dev)
        top = None
        if a.top:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
            with profile(activities=acts) as prof:
                with cap.block():
                    model.forward()
            top = prof.key_averages().table(sort_by="self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total",
                                            row_limit=a.top)
    del calls
    n = a.reps
    mn, mc = statistics.median(t_none), statistics.median(t_cap)
    calls_fwd = {k: len(v) // n for k, v in timer.ms.items()}
    per_fwd = {}  # median over forwards of the stage's time within one forward
    for k, v in timer.ms.items():
        sums = [0.0] * n
        for i, ms in v:
            sums[i] += ms
        per_fwd[k] = statistics.median(sums)
    on_call = {k: (per_fwd.pop(k), calls_fwd.pop(k)) for k in list(per_fwd) if k.startswith("on_call")}
    if top:
        print(top)
    print(f"model {model.name} ({model.params / 1e6:.1f}M params, latent {model.latent_shape}), device {a.device}, "
          f"{torch.get_num_threads()} threads, {a.mode}, median of {n}")
    print(f"none {mn:.2f} ms, {a.mode} {mc:.2f} ms: overhead {mc - mn:.2f} ms ({mc / mn:.2f}x); "
          f"staged run {statistics.median(t_staged):.2f} ms; combined_patch enter+exit {enter:.2f} ms")
    print(f"{'stage (median over forwards)':42} {'ms/fwd':>8} {'calls':>6} {'us/call':>8}")
    for k, v in sorted(per_fwd.items(), key=lambda kv: -kv[1]):
        c = calls_fwd.get(k, 0)
        print(f"{k:42} {v:8.2f} {c:6d} {1e3 * v / max(c, 1):8.1f}")
    for k, (v, c) in sorted(on_call.items()):
        print(f"{k:42} {v:8.2f} {c:6d} {1e3 * v / max(c, 1):8.1f}")
    missed = [k for k, v in timer.ms.items() if not v]
    if missed:
        print("not observed (the capture path no longer calls these through their module): " + ", ".join(missed))
    print(f"{'unattributed (overhead - stages above)':42} {mc - mn - sum(per_fwd.values()):8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
