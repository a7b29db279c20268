"""The single-setting checks every command shares."""

from __future__ import annotations

import math

import pytest

from aiba.errors import AibaError
from aiba.settings import DTYPES, device, dtype_name, fill_template, integer, number, writable_file


@pytest.mark.parametrize("template, message", [
    ("a {instrument} by {artist}", "unknown field {artist}"), ("a {instrument} {0}", "unknown field {0}"),
    ("a {instrument} {}", "unknown field {}"), ("a {instrument.upper} solo", "unknown field {instrument.upper}"),
    ("a {instrument[0]} solo", "unknown field {instrument[0]}"), ("a {instrument solo", "expected '}'"),
    ("a } {instrument}", "Single '}'"), (42, "must be text"),
])
def test_bad_templates(template, message):
    with pytest.raises(AibaError, match=message.replace("{", r"\{").replace("[", r"\[").replace("(", r"\(")):
        fill_template(template, {"instrument": "bass"})


def test_good_templates():
    assert fill_template("a {instrument} solo", {"instrument": "bass"}) == "a bass solo"
    assert fill_template("{{literal}} {instrument:>6}", {"instrument": "bass"}) == "{literal}   bass"


@pytest.mark.parametrize("value", [0, -3, 2.5, "x", None, True, math.nan])
def test_integer_refuses(value):
    with pytest.raises(AibaError, match="--steps must be"):
        integer("--steps", value, lo=1)


def test_integer_and_number_accept():
    assert integer("n", 3.0, lo=1) == 3 and integer("n", 10**12) == 10**12
    assert number("x", "0.5", lo=0, hi=1) == 0.5 and number("x", 1, lo=0, hi=1) == 1.0


@pytest.mark.parametrize("value, kw", [(math.nan, {}), (math.inf, {}), (-math.inf, {"lo": 0}), (0, {"lo": 0, "lo_open": True}),
                                       (2, {"lo": 0, "hi": 1}), (1, {"hi": 1, "hi_open": True}), ("a", {}), (True, {})])
def test_number_refuses(value, kw):
    with pytest.raises(AibaError, match="x must be a"):
        number("x", value, **kw)


def test_writable_file(tmp_path):
    assert writable_file("--json", tmp_path / "r.json") == tmp_path / "r.json"
    with pytest.raises(AibaError, match="is a folder") as e:
        writable_file("--json", tmp_path)
    assert e.value.kind == "io"
    with pytest.raises(AibaError, match="does not exist"):
        writable_file("--json", tmp_path / "no" / "r.json")
    (tmp_path / "f").write_text("x")
    with pytest.raises(AibaError, match="is a file"):
        writable_file("--json", tmp_path / "f" / "r.json")


def test_device_is_one_this_machine_has():
    import torch

    assert device("--device", "cpu") == "cpu" and device("--device", torch.device("cpu", 0)) == "cpu:0"
    for bad, said in (("tpu", "a torch device such as"), ("cuda:x", "a torch device such as"), (3.5, "a torch device such as"),
                      (f"cuda:{torch.cuda.device_count() + 1}", "is not usable here")):
        with pytest.raises(AibaError, match=said) as e:
            device("--device", bad)
        assert "--device" in str(e.value)
    if not torch.cuda.is_available():
        with pytest.raises(AibaError, match="sees no CUDA device"):
            device("--device", "cuda")


def test_dtype_names():
    import torch

    for name in DTYPES:
        assert dtype_name("--dtype", name) == name and isinstance(getattr(torch, name), torch.dtype)
    for bad in ("float17", "int8", None, torch.float16):
        with pytest.raises(AibaError, match="--dtype must be one of"):
            dtype_name("--dtype", bad)
