"""The CUDA correctness script runs end to end here (math backend) and reports every case."""

import importlib.util
import json
from pathlib import Path


def test_cuda_check_script_runs_on_cpu(tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "cuda_check.py"
    spec = importlib.util.spec_from_file_location("cuda_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "cuda_check.json").read_text())["rows"]
    sdpa = [r for r in rows if r["kernel"] == "sdpa:math"]
    assert len(sdpa) == 12 and all(r["status"] == "ok" and r["identical"] and r["max_err"] < 1e-5 for r in sdpa)
    assert {r["kernel"] for r in rows} >= {"xformers", "flash_attn"}
