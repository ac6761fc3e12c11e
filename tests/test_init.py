"""ResNet.init_params: independent and smooth layer weights.

The claims of the docstring: the independent draw is unchanged (same generator
stream as before the option existed), the smooth draw gives every K_n the
distribution of an independent draw, interpolates its knots, and keeps the
time-smoothness regulariser bounded as the depth grows, while the independent one
grows like N^2 / T.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ptoc
from ptoc.cli import main
from ptoc.model import SMOOTH_INIT_KNOTS, LayerInit, _interpolate_knots
from ptoc.objective import regulariser


def _net(depth, T=1.0, width=6, gamma_t=1e-4):
    return ptoc.ResNet(width=width, depth=depth, T=T, n_in=2, n_classes=3, gamma=0.0,
                       gamma_t=gamma_t, gamma_c=0.0)


def test_independent_is_the_default_and_the_same_stream():
    net = _net(5)
    rng = np.random.default_rng(3)
    K = rng.standard_normal((5, 6, 6)) * (1.0 / np.sqrt(6))
    K_in = rng.standard_normal((6, 2)) * (1.0 / np.sqrt(2))
    W = rng.standard_normal((3, 6)) * (1.0 / np.sqrt(6))
    for p in (net.init_params(3), net.init_params(3, layers="independent"),
              net.init_params(3, layers=LayerInit.INDEPENDENT)):
        assert np.array_equal(p.K, K) and np.array_equal(p.K_in, K_in)
        assert np.array_equal(p.W, W)


@settings(max_examples=20)
@given(depth=st.integers(1, 40), seed=st.integers(0, 10**6), scale=st.floats(0.1, 3.0))
def test_smooth_layers_interpolate_the_knots(depth, seed, scale):
    net = _net(depth)
    p = net.init_params(seed, scale=scale, layers="smooth")
    rng = np.random.default_rng(seed)
    m = min(depth, SMOOTH_INIT_KNOTS)
    knots = rng.standard_normal((m, 6, 6)) * (scale / np.sqrt(6))
    assert p.K.shape == (depth, 6, 6) and p.K.dtype == np.float64
    # the first and the last layer are knots; the opening and head follow the knots
    assert np.array_equal(p.K[0], knots[0]) and np.allclose(p.K[-1], knots[-1], rtol=1e-15)
    assert np.array_equal(p.K_in, rng.standard_normal((6, 2)) * (scale / np.sqrt(2)))
    # every layer lies on the normalised segment between its two knots
    s = np.arange(depth) * ((m - 1) / max(depth - 1, 1))
    for n in range(depth):
        j = min(int(np.floor(s[n])), max(m - 2, 0))
        f = s[n] - j
        if m == 1:
            want = knots[0]
        else:
            want = ((1 - f) * knots[j] + f * knots[j + 1]) / np.hypot(1 - f, f)
        np.testing.assert_allclose(p.K[n], want, rtol=1e-13, atol=1e-15)


def test_smooth_layers_have_the_variance_of_independent_ones():
    """Each K_n, over many seeds, has entries of variance scale^2 / d."""
    net = _net(13)
    samples = np.stack([net.init_params(seed, scale=2.0, layers="smooth").K
                        for seed in range(2000)])  # (seeds, N, d, d)
    var = samples.var(axis=(0, 2, 3))
    # 2000 x 36 entries per layer: the sample variance is within a few percent
    np.testing.assert_allclose(var, 4.0 / 6, rtol=0.05)


def test_the_time_regulariser_grows_like_n_squared_only_for_independent_layers():
    reg = {}
    for layers in ("independent", "smooth"):
        reg[layers] = [regulariser(_net(N), _net(N).init_params(0, layers=layers))
                       for N in (64, 256, 1024)]
    ind, smooth = reg["independent"], reg["smooth"]
    # independent: sum over N of |dK|^2 ~ 2 d, divided by h = T/N -> N^2
    assert 12 < ind[1] / ind[0] < 20 and 12 < ind[2] / ind[1] < 20
    assert ind[2] > 100  # gamma_t d N^2 / T ~ 1e-4 * 6 * 1024^2: far above a loss of ~1
    # smooth: each of the 8 segments between knots A, B adds about
    # |B - A|^2 (M - 1) / T ~ 2 d (M - 1) / T, so the term is about
    # gamma_t / 2 * 2 d (M - 1)^2 / T whatever N (bound with a factor 2 of margin), and
    # it settles as N grows
    bound = 2 * 1e-4 / 2 * 2 * 6 * (SMOOTH_INIT_KNOTS - 1) ** 2 / 1.0
    assert max(smooth) < bound and smooth[2] < 1.02 * smooth[1]


def test_bad_layers_option():
    with pytest.raises(ValueError, match="unknown layer initialisation 'wavy'.*'smooth'"):
        _net(3).init_params(0, layers="wavy")
    assert np.array_equal(_interpolate_knots(np.ones((1, 2, 2)), 4), np.ones((4, 2, 2)))


def test_train_cli_init_layers(tmp_path, capsys):
    for layers in ("independent", "smooth"):
        out = tmp_path / layers
        assert main(["train", "--depth", "4", "--epochs", "1", "--quiet", "--init-layers",
                     layers, "--output", str(out)]) == 0
        assert (out / "model.npz").exists()
    capsys.readouterr()
    assert main(["train", "--init-layers", "wavy"]) == 2
    assert "--init-layers" in capsys.readouterr().err
