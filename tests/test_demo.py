"""`aiba demo`: the planted model is captured, its map peaks where planted, the PNG is written."""

from aiba.cli import main
from aiba.tools.demo import run_demo


def test_demo_peaks_at_the_planted_cell(tmp_path):
    report = run_demo(tmp_path / "demo.png")
    assert [c["lattice"] for c in report["calls"]] == [(9, 7), (5, 4)]
    assert all(c["kind"] == "cross" and c["kernel"] == "sdpa" for c in report["calls"])
    (pt, pf), (et, ef) = report["overall_peak"], report["expected_peak_region"]
    assert abs(pt - et) <= 2 and abs(pf - ef) <= 2
    png = tmp_path / "demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_demo_cli(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d.png")]) == 0
    out = capsys.readouterr().out
    assert "layers.0" in out and "overall map peaks at" in out
