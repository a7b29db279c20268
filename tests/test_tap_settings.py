"""AttnTap checks every setting the same way in the constructor, configure() and assignment."""

from __future__ import annotations

import math

import pytest

from aiba import AttnTap
from aiba.errors import AibaError

BAD = [
    ("pool", "bogus"), ("pool", "Mean"), ("tau", 0), ("tau", -1.0), ("tau", math.nan), ("tau", math.inf),
    ("tau", "warm"), ("steps", (5, 1)), ("steps", (3, 3)), ("steps", (-1, 4)), ("steps", 7),
    ("cross_ratio", 1.5), ("cross_ratio", math.nan), ("gamma", 0), ("gamma", 1.01), ("gamma", math.nan),
    ("aggregate", "sum"), ("weights", "early"), ("weights", {"a": -1.0}), ("weights", {"a": math.nan}),
    ("batch", "both"), ("cfg_order", "first"), ("padding", "wrap"), ("kinds", ("cross", "other")),
    ("kernels", ("sdpa", "cuda")), ("keep", "everything"), ("budget_bytes", 0), ("budget_bytes", 1.5),
    ("target_T", 0), ("target_F", -2), ("target_T", 2.5), ("latent_shape", (0, 4)), ("latent_shape", (1, 2, 3)),
    ("prefix_tokens", -1), ("lattices", [(4,)]), ("layers", [3]),
]


def message(fn) -> str:
    with pytest.raises(AibaError) as e:
        fn()
    return str(e.value)


@pytest.mark.parametrize("key, value", BAD, ids=[f"{k}={v!r}" for k, v in BAD])
def test_bad_setting_is_refused_everywhere_alike(key, value):
    in_init = message(lambda: AttnTap(**{key: value}))
    in_configure = message(lambda: AttnTap().configure(**{key: value}))
    tap = AttnTap()
    before = getattr(tap, key)
    in_assignment = message(lambda: setattr(tap, key, value))
    assert in_init == in_configure == in_assignment
    assert key in in_init
    assert getattr(tap, key) == before  # a refused value leaves the tap as it was


GOOD = [("pool", "softmax"), ("pool", None), ("tau", 0.05), ("steps", (0, 1)), ("steps", [2, 9]),
        ("cross_ratio", 0), ("gamma", 1), ("weights", {"a": 0.0, "b": 2}), ("kinds", "self"),
        ("keep", ["calls", "steps"]), ("latent_shape", [16]), ("lattices", [[2, 3]]), ("target_T", 32.0)]


@pytest.mark.parametrize("key, value", GOOD, ids=[f"{k}={v!r}" for k, v in GOOD])
def test_good_setting_is_stored_alike(key, value):
    a = AttnTap(**{key: value})
    b = AttnTap().configure(**{key: value})
    c = AttnTap()
    setattr(c, key, value)
    assert getattr(a, key) == getattr(b, key) == getattr(c, key)


def test_configure_refuses_unknown_settings():
    with pytest.raises(AibaError, match="unknown tap setting 'poll'"):
        AttnTap().configure(poll="mean")


def test_normalised_forms():
    tap = AttnTap(steps=[1, 4], kinds="cross", keep="probs", latent_shape=[8, 4], target_T=16.0)
    assert tap.steps == (1, 4) and tap.kinds == frozenset({"cross"}) and tap.keep == frozenset({"probs"})
    assert tap.latent_shape == (8, 4) and tap.target_T == 16 and isinstance(tap.target_T, int)
