"""The argument checks shared by the modules (``ptoc._checks``): values and messages."""

import numpy as np
import pytest

from ptoc._checks import check_integer, check_real, scalar_entry


@pytest.mark.parametrize("value, kw, message", [
    (True, {}, "x must be a real number, got True"),
    (np.bool_(False), {"low": 0.0}, "x must be a real number, got "),
    ("abc", {}, "x must be a real number, got 'abc'"),
    (float("nan"), {}, "x must be finite, got nan"),
    (float("inf"), {"low": 0.0}, "x must be finite with 0.0 <= x, got inf"),
    (-1.0, {"low": 0.0}, "x must be finite with 0.0 <= x, got -1.0"),
    (0.0, {"low": 0.0, "low_open": True}, "x must be finite with 0.0 < x, got 0.0"),
    (1.0, {"low": 0.0, "high": 1.0, "high_open": True}, "x must be finite with 0.0 <= x < 1.0"),
    (2, {"high": 1.0}, "x must be finite with x <= 1.0, got 2"),
])
def test_check_real_refuses_with_a_message_naming_the_bounds(value, kw, message):
    with pytest.raises(ValueError) as info:
        check_real("x", value, **kw)
    assert str(info.value).startswith(message)


def test_check_real_returns_a_float_on_the_closed_bounds():
    assert check_real("x", np.float32(0.5), low=0.0, high=1.0) == 0.5
    assert check_real("x", 0, low=0.0) == 0.0 and check_real("x", "1e-3") == 1e-3
    assert type(check_real("x", np.int64(3))) is float


def test_check_integer():
    assert check_integer("n", np.int32(4), 1) == 4 and type(check_integer("n", 0, 0)) is int
    for bad in (0, 1.0, True, np.bool_(True), "2", None):
        with pytest.raises(ValueError, match=r"^n must be an integer >= 1, got "):
            check_integer("n", bad, 1)


def test_scalar_entry():
    d = {"step": np.array(7), "name": np.array("adam"), "v": np.zeros(2)}
    assert scalar_entry(d, "step", "a state") == 7 and type(scalar_entry(d, "step", "s")) is int
    assert scalar_entry(d, "name", "a state") == "adam"
    with pytest.raises(ValueError, match=r"^a state has no 'lr' entry$"):
        scalar_entry(d, "lr", "a state")
    with pytest.raises(ValueError, match=r"^a state entry 'v' must be a scalar$"):
        scalar_entry(d, "v", "a state")
