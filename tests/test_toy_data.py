"""toy_data: exact batch sizes, reproducibility, the distributions' shapes, and entropies."""
import math

import numpy as np
import pytest
from sklearn import datasets as skd

import toy_data
from toy_data import DATASETS, ENTROPY, inf_train_gen, log_density


@pytest.mark.parametrize("name", DATASETS)
def test_exact_batch_size_dtype_and_reproducible(name):
    for n in (1, 2, 3, 4, 5, 7, 11, 64, 1001):
        x = inf_train_gen(name, n, rng=n)
        assert x.shape == (n, 2) and x.dtype == np.float32 and np.isfinite(x).all()
    a, b = inf_train_gen(name, 257, 3), inf_train_gen(name, 257, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, inf_train_gen(name, 257, 4))
    g1, g2 = np.random.default_rng(9), np.random.default_rng(9)
    assert np.array_equal(inf_train_gen(name, 50, g1), inf_train_gen(name, 50, g2))
    assert not np.array_equal(inf_train_gen(name, 50, g1), inf_train_gen(name, 50, np.random.default_rng(9)))


def test_global_rng_untouched():
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    for name in DATASETS:
        inf_train_gen(name, 10, 0)
    assert np.array_equal(before, np.random.get_state()[1])


def test_bad_input():
    with pytest.raises(ValueError, match="8gaussians"):
        inf_train_gen("nope", 10)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            inf_train_gen("moons", bad)
    with pytest.raises(ValueError, match="closed form"):
        log_density("moons", np.zeros((1, 2)))


N = 200_000


def _moments(x):
    return x.mean(0), np.cov(x.T)


@pytest.mark.parametrize(
    "name,reference",
    [
        ("circles", lambda rng: 3 * skd.make_circles(N, factor=0.5, noise=0.08, random_state=rng)[0]),
        ("moons", lambda rng: 2 * skd.make_moons(N, noise=0.1, random_state=rng)[0] + np.array([-1.0, -0.2])),
        ("swissroll", lambda rng: skd.make_swiss_roll(N, noise=1.0, random_state=rng)[0][:, [0, 2]] / 5),
    ],
)
def test_matches_sklearn_shape(name, reference):
    """Same distribution as the sklearn generator it is modelled on (first two moments
    and a 2D histogram), though ours draws angles i.i.d. instead of evenly spaced."""
    x, y = inf_train_gen(name, N, 0).astype(np.float64), reference(1)
    (mx, cx), (my, cy) = _moments(x), _moments(y)
    np.testing.assert_allclose(mx, my, atol=0.03)
    np.testing.assert_allclose(cx, cy, atol=0.05 * np.abs(cy).max())
    edges = np.linspace(-4.5, 4.5, 19)
    hx = np.histogram2d(*x.T, bins=[edges, edges])[0] / N
    hy = np.histogram2d(*y.T, bins=[edges, edges])[0] / N
    assert np.abs(hx - hy).sum() < 0.03  # total-variation-like distance on the grid


def test_rings_radii_and_weights():
    x = inf_train_gen("rings", N, 0)
    r = np.linalg.norm(x, axis=1)
    radii = np.array([3.0, 2.25, 1.5, 0.75])
    nearest = np.abs(r[:, None] - radii).argmin(1)
    np.testing.assert_allclose(np.bincount(nearest, minlength=4) / N, 0.25, atol=0.01)
    for k, rad in enumerate(radii):
        assert abs(np.median(r[nearest == k]) - rad) < 0.02


def test_8gaussians_centres():
    x = inf_train_gen("8gaussians", N, 0)
    centres = toy_data._8G_CENTERS * 4 / 1.414
    k = ((x[:, None] - centres) ** 2).sum(-1).argmin(1)
    np.testing.assert_allclose(np.bincount(k, minlength=8) / N, 1 / 8, atol=0.005)
    for j in range(8):
        np.testing.assert_allclose(x[k == j].mean(0), centres[j], atol=0.02)
        np.testing.assert_allclose(x[k == j].std(0), 0.5 / 1.414, rtol=0.03)


def test_checkerboard_support():
    x = inf_train_gen("checkerboard", N, 0)
    assert np.all(np.isfinite(log_density("checkerboard", x)))
    assert np.abs(x).max() <= 4.0
    # 8 occupied unit*2 cells out of 16, equally filled
    cells = (np.floor(x[:, 0] / 2) + 2) * 4 + np.floor(x[:, 1] / 2) + 2
    counts = np.bincount(cells.astype(int), minlength=16) / N
    assert (counts > 0).sum() == 8
    np.testing.assert_allclose(counts[counts > 0], 1 / 8, atol=0.005)
    assert log_density("checkerboard", np.array([[1.0, -1.0]]))[0] == -np.inf  # an empty cell


def test_pinwheel_and_spirals_are_symmetric():
    p = inf_train_gen("pinwheel", N, 0)
    ang = np.arctan2(p[:, 1], p[:, 0])
    rot = np.stack([np.cos(ang + 2 * np.pi / 5), np.sin(ang + 2 * np.pi / 5)], 1)  # 5-fold symmetry
    h1 = np.histogram(np.arctan2(rot[:, 1], rot[:, 0]), 40, (-np.pi, np.pi))[0]
    h0 = np.histogram(ang, 40, (-np.pi, np.pi))[0]
    assert np.abs(h1 - h0).sum() / N < 0.03
    s = inf_train_gen("2spirals", N, 0)
    np.testing.assert_allclose(s.mean(0), 0.0, atol=0.02)  # arm 2 = -arm 1
    assert np.abs(s).max() < 4.0


@pytest.mark.parametrize("name", ["checkerboard", "8gaussians"])
def test_entropy_matches_monte_carlo(name):
    x = inf_train_gen(name, N, 7)
    mc = -log_density(name, x).mean()
    assert abs(mc - ENTROPY[name]) < 0.01, (mc, ENTROPY[name])


def test_entropy_table():
    assert set(ENTROPY) == set(DATASETS) and len(DATASETS) == 8
    assert ENTROPY["checkerboard"] == pytest.approx(math.log(32))
