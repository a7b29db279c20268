"""The whole capture benchmark as one command (``aiba bench`` over every backend).

On a CUDA machine: float16, batch 2, the full-size AudioLDM2 UNet (10.24 s latent) and the
Stable Audio Open DiT (10 s = 216 frames, 47.55 s = 1024 frames), random weights, all modes.
On a CPU machine: the default CPU-sized models. Installs nothing; a backend whose library
is missing is recorded as an error and skipped. Prints a short table last and writes
``<cuda|cpu>-<date>.json`` under ``--out`` (default ``$OUT``, else benchmarks/results).

    python benchmarks/bench_capture.py                 # GPU if there is one, else CPU
    python benchmarks/bench_capture.py --device cpu --reps 5 --out /tmp
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing aiba


def main(argv: list[str] | None = None) -> int:
    import torch

    from aiba.tools import bench
    from aiba.atomic import atomic_write

    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--full-size", action=argparse.BooleanOptionalAction, default=None,
                    help="default: full size on CUDA, CPU-sized on the CPU")
    ap.add_argument("--backends", default="audioldm2,stable-audio", help=f"comma-separated subset of {bench.BENCH_BACKENDS}")
    ap.add_argument("--modes", default=",".join(bench.MODES))
    ap.add_argument("--reps", type=int, default=None, help="default: 10 on CUDA, 5 on the CPU")
    ap.add_argument("--warmup", type=int, default=None, help="default: 3 on CUDA, 1 on the CPU")
    ap.add_argument("--steps", type=int, default=4, help="steps run to measure the capture state")
    ap.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: 1 on the CPU, steady timings on a shared machine; torch's on CUDA)")
    ap.add_argument("--no-per-call", action="store_true", help="skip the per-call host-overhead measurement")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args(argv)

    on_cuda = torch.device(a.device).type == "cuda"
    full = on_cuda if a.full_size is None else a.full_size
    reps = a.reps if a.reps is not None else (10 if on_cuda else 5)
    warmup = a.warmup if a.warmup is not None else (3 if on_cuda else 1)
    modes = tuple(m for m in a.modes.split(",") if m)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731

    result = None
    t0 = time.perf_counter()
    for backend in [b for b in a.backends.split(",") if b]:
        cfg = bench.BenchConfig(backend=backend, size="full" if full else "default", device=a.device, dtype=a.dtype, batch=2,
                                modes=modes, reps=reps, warmup=warmup, steps=a.steps, threads=a.threads,
                                per_call=not a.no_per_call)
        result = bench.run(cfg, log, result)
    result["info"]["wall_s"] = time.perf_counter() - t0

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{'cuda' if on_cuda else 'cpu'}-{datetime.date.today().isoformat()}.json"
    atomic_write(path, json.dumps(result, indent=1))
    log(f"wrote {path}")
    print(bench.format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
