"""Host cost of a call the tap does not select (CPU, one thread).

A small attention module (module -> F.scaled_dot_product_attention) issues a self call;
the tap captures cross calls only, so the call is tagged, recorded (or only counted) and
dropped. Prints the median thread-CPU time per call of plain SDPA and the extra of each
capture setting, interleaved repetitions.

    python benchmarks/select_cost.py
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from aiba import AttnTap, combined_patch


class _Attn(nn.Module):
    def forward(self, q, k, v, encoder_hidden_states=None):
        return F.scaled_dot_product_attention(q, k, v)


class _Mha(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)


def _per_call(fn, n: int) -> float:
    t0 = time.thread_time_ns()
    for _ in range(n):
        fn()
    return (time.thread_time_ns() - t0) / n / 1e3  # us


def main(n: int = 2000, reps: int = 15) -> dict:
    torch.set_num_threads(1)
    net = nn.ModuleDict({"attn": _Attn(), "mha": _Mha()}).eval()
    q = torch.randn(1, 2, 16, 8)
    x = torch.randn(1, 16, 16)
    settings = {"plain": None, "records=all": AttnTap(kinds=("cross",)), "records=selected": AttnTap(kinds=("cross",), records="selected")}
    cases = {"sdpa via module": lambda: net["attn"](q, q, q), "nn.MultiheadAttention": lambda: net["mha"](x)}
    out = {}
    with torch.no_grad():
        for case, fn in cases.items():
            times = {s: [] for s in settings}
            for _ in range(reps):
                for s, tap in settings.items():
                    if tap is None:
                        times[s].append(_per_call(fn, n))
                    else:
                        with combined_patch(tap, model=net):
                            times[s].append(_per_call(fn, n))
                        tap.reset()
            med = {s: statistics.median(v) for s, v in times.items()}
            out[case] = med
            print(f"{case}: plain {med['plain']:.2f} us/call; not selected: "
                  + ", ".join(f"{s} +{med[s] - med['plain']:.2f} us" for s in settings if s != "plain"))
    return out


if __name__ == "__main__":
    main()
