"""``aiba bench``: the harness's logic on tiny models (never a wall-clock bound)."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
import torch.nn.functional as F

from aiba.tools import bench
from aiba.errors import AibaError

MODE_KEYS = {"ms", "ms_min", "ms_max", "ms_all", "ratio", "ratio_min", "peak_mib", "peak_extra_mib", "state_mib_2",
             "state_mib", "state_grows", "state_mib_200", "records_200", "host_copies_per_step", "host_mib_per_step",
             "host_copies_total", "captured_calls", "enter_ms", "layers"}
MODEL_KEYS = {"backend", "size", "params", "config", "latent_shape", "prefix_tokens", "context_tokens",
              "calls_per_forward", "modes"}
INFO_KEYS = {"torch", "aiba", "device", "device_name", "dtype", "batch", "reps", "warmup", "steps", "threads", "notes"}
STEPS = 3


@pytest.fixture(scope="module")
def generic_result():
    cfg = bench.BenchConfig(backend="generic", size="tiny", reps=3, warmup=0, steps=STEPS)
    return bench.run(cfg)


def test_schema(generic_result):
    r = generic_result
    assert r["schema"] == bench.SCHEMA
    assert INFO_KEYS <= set(r["info"])
    assert r["info"]["batch"] == 2 and r["info"]["dtype"] == "float32"
    (name, m), = r["models"].items()
    assert name == "generic_tiny"
    assert MODEL_KEYS <= set(m)
    assert list(m["modes"]) == list(bench.MODES)
    for mode, row in m["modes"].items():
        assert MODE_KEYS <= set(row), (mode, MODE_KEYS - set(row))
    json.loads(json.dumps(r))  # plain JSON: no tensors, no NaN-only oddities


def test_ratios_from_measured_numbers(generic_result):
    modes = generic_result["models"]["generic_tiny"]["modes"]
    none = modes["none"]
    for row in modes.values():
        assert len(row["ms_all"]) == 3
        assert row["ms"] == sorted(row["ms_all"])[1]  # the median of 3: the middle value
        assert row["ms_min"] == min(row["ms_all"]) and row["ms_max"] == max(row["ms_all"])
        assert row["ratio"] == pytest.approx(row["ms"] / none["ms"], rel=1e-12)
        assert row["ratio_min"] == pytest.approx(row["ms_min"] / none["ms_min"], rel=1e-12)
    assert none["ratio"] == 1.0


def test_ratios_with_injected_times(monkeypatch):
    """Times fed in per mode come out as medians and ratios exactly."""
    fake = {"none": [10.0, 30.0, 20.0], "eager": [40.0, 60.0, 50.0], "aiba-cross": [21.0, 22.0, 23.0]}
    seen = {m: iter(v) for m, v in fake.items()}
    real = bench.timed_forward

    def timed(mode, device):
        real(mode, device)  # still runs the forward in the mode's block
        return next(seen[mode.name])

    monkeypatch.setattr(bench, "timed_forward", timed)
    cfg = bench.BenchConfig(backend="generic", size="tiny", modes=tuple(fake), reps=3, warmup=0, steps=2)
    model = bench.build_models(cfg)[0]
    rows = bench.bench_model(model, cfg)["modes"]
    assert rows["none"]["ms"] == 20.0 and rows["eager"]["ms"] == 50.0 and rows["aiba-cross"]["ms"] == 22.0
    assert rows["eager"]["ratio"] == 2.5 and rows["aiba-cross"]["ratio"] == 1.1
    assert rows["eager"]["ratio_min"] == 4.0 and rows["aiba-cross"]["ratio_min"] == 2.1


def test_calls_copies_and_state(generic_result):
    m = generic_result["models"]["generic_tiny"]
    depth = m["config"]["depth"]
    assert m["calls_per_forward"] == {"cross": depth, "self": depth}
    modes = m["modes"]
    mib = 1 << 20
    assert modes["none"]["captured_calls"] == 0 and modes["none"]["host_copies_per_step"] == 0
    # eager: one CPU copy of a (B, Lq, Lk) map per captured call
    b, n = 2, m["config"]["T"] * m["config"]["F"]
    for mode, kinds in (("eager", ("cross",)), ("eager-all", ("cross", "self"))):
        row = modes[mode]
        calls = sum(m["calls_per_forward"][k] for k in kinds)
        assert row["captured_calls"] == calls
        assert row["host_copies_per_step"] == calls
        per_step = b * n * (depth * m["config"]["context_tokens"] + (depth * n if mode == "eager-all" else 0)) * 4
        assert row["host_mib_per_step"] * mib == per_step
        # the stored maps grow with every step
        assert row["state_grows"] and row["state_mib"] * mib == per_step * STEPS
        assert row["state_mib_2"] * mib == per_step * 2
        assert row["state_mib_200"] == pytest.approx(per_step * 200 / mib)
    # aiba: no host copy, a state that does not grow, one grid per captured layer
    for mode, kinds in (("aiba-cross", ("cross",)), ("aiba-all", ("cross", "self"))):
        row = modes[mode]
        calls = sum(m["calls_per_forward"][k] for k in kinds)
        assert row["captured_calls"] == calls
        assert row["host_copies_per_step"] == 0 and row["host_mib_per_step"] == 0
        assert row["layers"] == calls
        assert row["state_mib"] == row["state_mib_2"] and not row["state_grows"]
        t, f = m["latent_shape"]
        assert row["state_mib"] * mib == calls * t * f * 4  # each layer summed on its lattice (cond item)
        assert row["state_mib_200"] == row["state_mib"]
        assert row["records_200"] == 200 * (m["calls_per_forward"]["cross"] + m["calls_per_forward"]["self"])
        cells = {"cross": 10 * 1024 + 10 * 256 + 12 * 64, "self": 20 * 1024 + 20 * 256 + 24 * 64}  # full UNet config
        assert row["state_mib_200_audioldm2"] * mib == sum(cells[k] for k in kinds) * 4
        assert row["state_mib_200_audioldm2"] <= 64
    assert all(row["peak_mib"] is None for row in modes.values())  # CPU: no allocator statistics


def test_keep_probs_counts_host_copies():
    """A tap asked to keep probabilities copies them: the counter sees it."""
    cfg = bench.BenchConfig(backend="generic", size="tiny", modes=("none", "aiba-cross"), reps=1, warmup=0, steps=2)
    model = bench.build_models(cfg)[0]
    mode = bench.Mode("aiba-cross", model, cfg)
    mode.tap.keep = frozenset({"probs"})
    with torch.no_grad():
        bench._counts(mode, torch.device("cpu"))  # the first call per key length builds (and syncs on) its pooling weights
        copies, _, calls = bench._counts(mode, torch.device("cpu"))
    assert calls == model.config["depth"] and copies == calls


def test_host_copy_counter_restores():
    before = {n: vars(torch.Tensor).get(n) for n in bench._HOST_METHODS}
    t = torch.arange(6.0)
    c = bench.HostCopyCounter(torch.device("cpu"))
    with c.counting():
        t.cpu(), t[0].item(), t.tolist(), bool(t[1]), float(t[2]), int(t[3])
    assert c.count == 6 and c.bytes == t.numel() * 4 * 2 + 4 * 4
    assert {n: vars(torch.Tensor).get(n) for n in bench._HOST_METHODS} == before
    with pytest.raises(RuntimeError), c.counting():
        raise RuntimeError("inside")
    assert {n: vars(torch.Tensor).get(n) for n in bench._HOST_METHODS} == before


def test_eager_matches_sdpa_and_restores():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 12, 8), torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8)
    ref = F.scaled_dot_product_attention(q, k, v)
    orig = F.scaled_dot_product_attention
    cap = bench.EagerCapture()
    with cap.patch():
        assert F.scaled_dot_product_attention is not orig
        out = F.scaled_dot_product_attention(q, k, v)
        F.scaled_dot_product_attention(q, q, q)  # self: not kept
    assert F.scaled_dot_product_attention is orig
    torch.testing.assert_close(out, ref)
    assert cap.calls == 2 and len(cap.store) == 1 and cap.store[0].shape == (2, 12, 5)
    p = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1).mean(1)
    torch.testing.assert_close(cap.store[0], p)


def test_config_errors():
    with pytest.raises(AibaError, match="backend"):
        bench.BenchConfig(backend="nope")
    with pytest.raises(AibaError, match="modes"):
        bench.BenchConfig(modes=("none", "fast"))
    with pytest.raises(AibaError, match="steps"):
        bench.BenchConfig(steps=1)


def test_cli_writes_json_and_table(tmp_path, capsys):
    from aiba.cli import main

    out = tmp_path / "b.json"
    rc = main(["bench", "--backend", "generic", "--size", "tiny", "--modes", "none,aiba-cross", "--reps", "1", "--warmup", "0",
               "--steps", "2", "--json", str(out), "-q"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert set(data["models"]["generic_tiny"]["modes"]) == {"none", "aiba-cross"}
    table = capsys.readouterr().out.strip().splitlines()
    assert table[-2].split()[:2] == ["generic_tiny", "aiba-cross"]
    assert table[-1].startswith("state of a 200-step full-size AudioLDM2 run") and "aiba-cross 0.05 MiB" in table[-1]


@pytest.mark.parametrize("backend, module", [("audioldm2", "diffusers"), ("stable-audio", "stable_audio_tools")])
def test_backends_default_sizes(backend, module):
    pytest.importorskip(module)
    cfg = bench.BenchConfig(backend=backend, size="tiny", modes=("none", "eager", "aiba-all"), reps=1, warmup=0, steps=2)
    r = bench.run(cfg)
    assert r["models"] and not any("error" in m for m in r["models"].values()), r["models"]
    for m in r["models"].values():
        modes = m["modes"]
        assert modes["eager"]["captured_calls"] == m["calls_per_forward"]["cross"] > 0
        assert modes["aiba-all"]["captured_calls"] == sum(m["calls_per_forward"].values())
        assert modes["aiba-all"]["host_copies_per_step"] == 0
        assert modes["aiba-all"]["state_mib"] == modes["aiba-all"]["state_mib_2"]


def test_cpu_run_uses_one_thread_and_restores(generic_result):
    assert generic_result["info"]["threads"] == 1
    before = torch.get_num_threads()
    bench.run(bench.BenchConfig(backend="generic", size="tiny", modes=("none",), reps=1, warmup=0, steps=2, per_call=False,
                                threads=2))
    assert torch.get_num_threads() == before


def test_timed_forward_warms_up_inside_the_block():
    """The timed forward is the second one inside the capture block."""
    from aiba.capture.patch import active_taps

    cfg = bench.BenchConfig(backend="generic", size="tiny", modes=("none", "aiba-cross"), reps=1, warmup=0, steps=2)
    model = bench.build_models(cfg)[0]
    inside = []
    fwd = model.forward
    model.forward = lambda: (inside.append(bool(active_taps())), fwd())[1]
    mode = bench.Mode("aiba-cross", model, cfg)
    bench.timed_forward(mode, torch.device("cpu"))
    assert inside == [True, True]
    assert mode.tap.step == 2  # the warm-up forward and the timed one are separate steps


def test_per_call_overheads_are_paired_differences(generic_result):
    pc = generic_result["per_call"]
    assert set(pc["us"]) == set(bench.PER_CALL_MODES) and set(pc["overhead_us"]) == set(bench.PER_CALL_LINES)
    assert pc["threads"] == 1 and pc["reps"] == 3
    for line, (m, base) in bench.PER_CALL_LINES.items():
        for us, overhead in (("us", "overhead_us"), ("in_call_us", "in_call_overhead_us")):
            row = pc[overhead][line]
            assert row["all"] == [a - b for a, b in zip(pc[us][m]["all"], pc[us][base]["all"])]
            assert row["median"] == statistics.median(row["all"]) and row["min"] <= row["q1"] <= row["q3"] <= row["max"]
    for m in bench.PER_CALL_MODES:  # a positive time per repetition
        assert len(pc["in_call_us"][m]["all"]) == 3 and 0 < pc["in_call_us"][m]["median"]
    for row in generic_result["models"]["generic_tiny"]["modes"].values():
        assert row["ratio_all"] == [a / b for a, b in zip(row["ms_all"], generic_result["models"]["generic_tiny"]["modes"]["none"]["ms_all"])]
        assert row["ratio_paired"] == statistics.median(row["ratio_all"])
    assert bench.format_table(generic_result).splitlines()[1].startswith("per call over plain SDPA")
