"""atomic_write: the target is replaced whole or not at all, and no temporary is left."""

import numpy as np
import pytest

from aiba.atomic import atomic_write


def test_text_bytes_and_writer(tmp_path):
    assert atomic_write(tmp_path / "a.json", '{"x": 1}').read_text() == '{"x": 1}'
    assert atomic_write(tmp_path / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    out = atomic_write(tmp_path / "c.npz", lambda tmp: np.savez(tmp, v=np.arange(3)))  # suffix kept for numpy
    with np.load(out) as z:
        assert z["v"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin", "c.npz"]


def test_failure_keeps_the_old_file_and_no_temporary(tmp_path):
    path = atomic_write(tmp_path / "r.txt", "old")

    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.txt"]
