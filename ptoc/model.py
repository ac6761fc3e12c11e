"""The network description and its parameters.

A :class:`ResNet` is the discrete optimal-control problem of :doc:`/theory/resnet`:
an opening layer, ``N`` forward-Euler residual layers on ``[0, T]`` with step
``h = T/N`` and a softmax classifier. Its trainable values are a :class:`Params`,
which converts losslessly to and from a plain ``dict`` of NumPy arrays so that
ptoc can be checked against any other framework.

Array layout (used everywhere in ptoc): a batch of ``S`` samples is an array of
shape ``(S, features)``, one sample per row, C-contiguous.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields

import numpy as np

from ._checks import check_positive_int, check_real
from ._options import OptionEnum
from .activations import Activation

#: Keys of the parameter dictionary, in a fixed order.
PARAM_KEYS = ("K", "b", "K_in", "b_in", "W", "mu")
_SUPPORTED_DTYPES = (np.dtype(np.float64), np.dtype(np.float32))


class Opening(OptionEnum, what="opening layer"):
    """The opening layer mapping an input ``y`` to the first state ``x_0``.

    ``DENSE``: ``x_0 = sigma(K_in y + b_in)``. ``IDENTITY``: ``x_0 = y`` (needs
    ``n_in == width``; the parameters then have no ``K_in``, ``b_in``).
    """

    DENSE = "dense"
    IDENTITY = "identity"


def _interpolate_knots(knots: np.ndarray, n: int) -> np.ndarray:
    """``n`` arrays from ``M = len(knots)`` draws at evenly spread positions: position
    ``s = i (M - 1) / (n - 1)`` of item ``i`` lies between knots ``j = floor(s)`` and
    ``j + 1``; with ``f = s - j`` the item is ``((1 - f) A + f B) / sqrt((1 - f)^2 + f^2)``,
    which keeps the variance of independent Gaussian knots."""
    m = len(knots)
    if m == 1 or n == 1:
        return np.repeat(knots[:1], n, axis=0)
    s = np.arange(n) * ((m - 1) / (n - 1))
    j = np.minimum(np.floor(s).astype(np.int64), m - 2)
    f = (s - j)[:, None, None]
    w0, w1 = 1.0 - f, f
    return (w0 * knots[j] + w1 * knots[j + 1]) / np.sqrt(w0**2 + w1**2)


class LayerInit(OptionEnum, what="layer initialisation"):
    """How :meth:`ResNet.init_params` relates the weights of different layers.

    ``INDEPENDENT``: every ``K_n`` drawn on its own. ``SMOOTH``: ``K_n`` varies
    smoothly with the layer's time, so the time-smoothness regulariser stays bounded
    as the depth grows (see :meth:`ResNet.init_params`).
    """

    INDEPENDENT = "independent"
    SMOOTH = "smooth"


#: Number of independent draws ("knots", evenly spread from the first layer to the
#: last) that ``init_params(layers="smooth")`` interpolates between.
SMOOTH_INIT_KNOTS = 9


def _check_dtype(value: object) -> np.dtype:
    try:
        dt = np.dtype(value)  # type: ignore[call-overload]
    except TypeError:
        raise ValueError(f"dtype {value!r} is not a NumPy dtype") from None
    if dt not in _SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be float64 or float32, got {dt}")
    return dt


def _check_magnitude(name: str, value: object, dtype: np.dtype) -> float:
    """A finite ``value`` with ``0 <= value <= 1/eps`` (``eps`` the machine epsilon of
    ``dtype``): a weight or a scale beyond ``1/eps`` makes every term of order one that it
    is added to vanish in the rounding (the data loss beside the regulariser, an input
    beside the weights it multiplies)."""
    v = check_real(name, value)
    high = 1.0 / float(np.finfo(dtype).eps)
    if not 0.0 <= v <= high:
        raise ValueError(
            f"{name} must lie in [0, {high:.4g}] (1/machine epsilon of {dtype}: a larger "
            f"value makes the terms of order one beside it vanish in the rounding), got "
            f"{value!r}")
    return v


def _check_final_time(value: object, depth: int, dtype: np.dtype) -> float:
    """The final time ``T``, finite with ``depth * eps <= T <= 1/eps`` for ``dtype``.

    The step ``h = T / depth`` must be at least ``eps``: a smaller step changes no state
    entry of size one (``x + h sigma(a) == x``), so the layers would do nothing. ``T`` must
    be at most ``1/eps``: a state moved by up to ``T`` (``|sigma| <= 1`` for tanh) keeps no
    digit of an input of size one.
    """
    v = check_real("T", value)
    eps = float(np.finfo(dtype).eps)
    low, high = depth * eps, 1.0 / eps
    if not low <= v <= high:
        raise ValueError(
            f"T must lie in [{low:.4g}, {high:.4g}] for depth={depth} in {dtype}: the step "
            f"h = T/depth must be at least the machine epsilon {eps:.4g} (a smaller step "
            f"leaves every state of size one unchanged) and T at most 1/epsilon (a state "
            f"moved by T keeps no digit of an input of size one), got {value!r}")
    return v


def check_param_arrays(items: Mapping, shapes: Mapping[str, tuple[int, ...]], dtype,
                       network: str, layers: tuple[int, int] | None = None,
                       hint: str = "") -> Params:
    """The arrays of ``items`` as a :class:`Params` of ``dtype``, checked against
    ``shapes`` (one entry per key; ``layers``: the layers the arrays hold, for the
    message). ``ValueError`` names a missing or unexpected key (with ``hint``), a wrong
    shape, a non-real dtype or a non-finite entry; ``network`` describes the network."""
    missing = [k for k in shapes if items.get(k) is None]
    extra = [k for k, v in items.items() if k not in shapes and v is not None]
    if missing:
        raise ValueError(f"params is missing {missing}; expected keys {list(shapes)}")
    if extra:
        raise ValueError(f"params has unexpected keys {extra}{hint}")
    out: dict[str, np.ndarray] = {}
    for key, shape in shapes.items():
        arr = np.asarray(items[key])
        if arr.shape != shape:
            held = "" if layers is None else f" (layers {layers[0]}..{layers[1] - 1})"
            raise ValueError(f"params[{key!r}] has shape {arr.shape}, expected {shape}{held} "
                             f"for {network}")
        if arr.dtype.kind not in "fiu":
            raise ValueError(f"params[{key!r}] has non-real dtype {arr.dtype}")
        arr = np.ascontiguousarray(arr, dtype=dtype)
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"params[{key!r}] contains non-finite values (NaN or inf)")
        out[key] = arr
    return Params.from_dict(out)


@dataclass(frozen=True)
class ResNet:
    """A residual network seen as a discrete optimal-control problem.

    Forward propagation (:doc:`/theory/resnet`; Günther et al. 2020)::

        x_0     = sigma(K_in y + b_in)                (or x_0 = y, identity opening)
        x_{n+1} = x_n + h sigma(K_n x_n + b_n),       n = 0..N-1,  h = T/N
        z       = W x_N + mu,   loss = mean_s CE(softmax(z_s), c_s)

    and the regulariser
    ``R = gamma/2 sum_n h(|K_n|^2 + |b_n|^2) + gamma_t/2 sum_n h |(theta_{n+1} - theta_n)/h|^2
    + gamma_c/2 (|W|^2 + |mu|^2 + |K_in|^2 + |b_in|^2)``, with ``theta_n = (K_n, b_n)``.

    Theory: :doc:`/theory/resnet`.

    Parameters
    ----------
    width : int
        State dimension ``d``.
    depth : int
        Number of residual layers ``N``.
    T : float
        Final time; the step is ``h = T / N``. It must lie in ``[N eps, 1/eps]`` with
        ``eps`` the machine epsilon of ``dtype`` (``h >= eps``: a smaller step changes
        no state of size one; ``T <= 1/eps``: a state moved by ``T`` keeps no digit of
        an input of size one).
    activation : Activation or str
        ``"tanh"``, ``"relu"`` or ``"smoothrelu"``.
    n_in : int
        Input dimension ``d_in``.
    n_classes : int
        Number of classes ``C`` (at least 2).
    opening : Opening or str
        ``"dense"`` (default) or ``"identity"`` (requires ``n_in == width``).
    gamma, gamma_t, gamma_c : float
        Weights of the Tikhonov, time-smoothness and classifier/opening regularisers,
        in ``[0, 1/eps]`` (a larger weight leaves the data loss, of order one, below
        the rounding error of the regulariser).
    dtype : numpy dtype
        ``float64`` (default) or ``float32``.

    Examples
    --------
    >>> import ptoc
    >>> net = ptoc.ResNet(width=8, depth=32, T=1.0, activation="tanh", n_in=2, n_classes=5)
    >>> net.h
    0.03125
    """

    width: int
    depth: int
    T: float = 1.0
    activation: Activation = Activation.TANH
    n_in: int = 2
    n_classes: int = 2
    opening: Opening = Opening.DENSE
    gamma: float = 1e-4
    gamma_t: float = 1e-4
    gamma_c: float = 1e-4
    dtype: np.dtype = field(default=np.dtype(np.float64))

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "width", check_positive_int("width", self.width))
        set_(self, "depth", check_positive_int("depth", self.depth))
        set_(self, "n_in", check_positive_int("n_in", self.n_in))
        set_(self, "n_classes", check_positive_int("n_classes", self.n_classes))
        if self.n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {self.n_classes}")
        dt = _check_dtype(self.dtype)
        set_(self, "dtype", dt)
        set_(self, "T", _check_final_time(self.T, self.depth, dt))
        set_(self, "activation", Activation.parse(self.activation))
        set_(self, "opening", Opening.parse(self.opening))
        for name in ("gamma", "gamma_t", "gamma_c"):
            set_(self, name, _check_magnitude(name, getattr(self, name), dt))
        if self.opening is Opening.IDENTITY and self.n_in != self.width:
            raise ValueError(
                f"an identity opening layer needs n_in == width, got n_in={self.n_in}, "
                f"width={self.width}; use opening='dense'"
            )

    @property
    def h(self) -> float:
        """Layer step ``h = T / N``."""
        return self.T / self.depth

    @property
    def has_opening_weights(self) -> bool:
        """True when the opening layer is dense (has ``K_in``, ``b_in``)."""
        return self.opening is Opening.DENSE

    def param_shapes(self, layers: tuple[int, int] | None = None) -> dict[str, tuple[int, ...]]:
        """Shapes of the parameter arrays, keyed as in :data:`PARAM_KEYS`.

        With ``layers=(start, stop)``, those of a slice holding the residual layers
        ``start..stop-1`` only (``K`` and ``b`` have ``stop - start`` rows; the head is
        whole), as one rank of a layer-parallel run holds them.
        """
        d, N = self.width, self.depth
        if layers is not None:
            N = layers[1] - layers[0]
        shapes = {"K": (N, d, d), "b": (N, d)}
        if self.has_opening_weights:
            shapes["K_in"] = (d, self.n_in)
            shapes["b_in"] = (d,)
        shapes["W"] = (self.n_classes, d)
        shapes["mu"] = (self.n_classes,)
        return shapes

    @property
    def n_params(self) -> int:
        """Total number of scalar parameters."""
        return int(sum(np.prod(s) for s in self.param_shapes().values()))

    def init_params(self, seed: int | np.random.Generator | None = 0, scale: float = 1.0,
                    layers: LayerInit | str = LayerInit.INDEPENDENT) -> Params:
        """Random parameters: Gaussian weights of variance ``scale^2 / fan_in``, zero biases.

        ``K_n ~ N(0, scale^2/d)``, ``K_in ~ N(0, scale^2/d_in)``, ``W ~ N(0, scale^2/d)``;
        ``b_n = b_in = mu = 0``. ``scale = 0`` gives all-zero parameters, for which the
        loss is exactly ``ln C``.

        Parameters
        ----------
        seed : int, Generator or None
            An integer ``>= 0``, a NumPy Generator, or None for fresh entropy.
        scale : float
            Standard deviation factor, ``0 <= scale <= 1/eps``.
        layers : LayerInit or str
            ``"independent"`` (default): every ``K_n`` is an independent draw. The
            time-smoothness term of the regulariser,
            ``gamma_t/2 sum_n h |(K_{n+1} - K_n)/h|^2``, then starts at about
            ``gamma_t scale^2 d N^2 / T``: for a deep network (``N = 1024``, ``T = 1``)
            it outweighs the loss by orders of magnitude. ``"smooth"``: ``K_n`` is
            drawn at ``SMOOTH_INIT_KNOTS`` = 9 layers spread evenly from the first to
            the last (fewer if ``N < 9``) and interpolated between them,
            ``K_n = (w_0 A + w_1 B) / sqrt(w_0^2 + w_1^2)`` with the linear weights
            ``w_0, w_1`` of layer ``n`` between its knots ``A, B``. Each ``K_n`` has
            the same distribution as an independent draw, but neighbouring layers
            differ by ``O(1/N)``, so the time-smoothness term stays bounded as ``N``
            grows: the weights of a neural ODE ``K(t)`` sampled at ``t_n = n h``.

        Raises
        ------
        ValueError
            For a ``seed`` that is not None, an integer ``>= 0`` or a Generator, a
            ``scale`` outside ``[0, 1/eps]`` (``eps`` the machine epsilon of the dtype)
            or an unknown ``layers``.
        """
        if not (seed is None or isinstance(seed, np.random.Generator)):
            if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) \
                    or seed < 0:
                raise ValueError("seed must be None, an integer >= 0 or a "
                                 f"numpy.random.Generator, got {seed!r}")
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        scale = _check_magnitude("scale", scale, self.dtype)
        layers = LayerInit.parse(layers)
        d, N = self.width, self.depth
        dt = self.dtype

        def gauss(shape: tuple[int, ...], fan_in: int) -> np.ndarray:
            return (rng.standard_normal(shape) * (scale / np.sqrt(fan_in))).astype(dt)

        if layers is LayerInit.INDEPENDENT:
            K = gauss((N, d, d), d)
        else:
            K = _interpolate_knots(gauss((min(N, SMOOTH_INIT_KNOTS), d, d), d), N).astype(dt)
        K_in = gauss((d, self.n_in), self.n_in) if self.has_opening_weights else None
        W = gauss((self.n_classes, d), d)
        return Params(
            K=K,
            b=np.zeros((N, d), dt),
            K_in=K_in,
            b_in=np.zeros(d, dt) if self.has_opening_weights else None,
            W=W,
            mu=np.zeros(self.n_classes, dt),
        )

    def zero_params(self) -> Params:
        """All-zero parameters of the right shapes and dtype."""
        shapes = self.param_shapes()
        return Params.from_dict({k: np.zeros(s, self.dtype) for k, s in shapes.items()})

    def check_params(self, params: Params | Mapping[str, np.ndarray],
                     layers: tuple[int, int] | None = None) -> Params:
        """Validate ``params`` against this network and return them as :class:`Params`.

        Accepts a :class:`Params` or a mapping with the keys of :meth:`param_shapes`.
        Raises ``ValueError`` naming the offending key for a missing or unexpected
        key, a wrong shape, a non-real dtype or a non-finite entry. Arrays are
        converted to the network's dtype and made C-contiguous (no copy when they
        already are). With ``layers=(start, stop)``, ``K`` and ``b`` must hold the
        residual layers ``start..stop-1`` only (:meth:`param_shapes`).
        """
        if isinstance(params, Params):
            items = {k: v for k, v in params.items()}
        elif isinstance(params, Mapping):
            items = dict(params)
        else:
            raise TypeError(
                f"params must be a ptoc.Params or a dict of arrays, got {type(params).__name__}"
            )
        extra = {k for k, v in items.items() if k not in self.param_shapes(layers)
                 and v is not None}
        hint = (" (this network's opening layer is the identity: it has no K_in, b_in)"
                if extra & {"K_in", "b_in"} else "")
        return check_param_arrays(items, self.param_shapes(layers), self.dtype,
                                  self.describe(), layers, hint)

    def describe(self) -> str:
        """One-line summary, e.g. ``ResNet(d=8, N=32, T=1, tanh, 2->5)``."""
        return (
            f"ResNet(d={self.width}, N={self.depth}, T={self.T:g}, {self.activation.value}, "
            f"{self.n_in}->{self.n_classes}, opening={self.opening.value})"
        )


@dataclass
class Params(Mapping):
    """Trainable parameters of a :class:`ResNet`.

    The controls ``theta`` of the optimal-control problem (Günther et al. 2020):
    ``theta_n = (K_n, b_n)`` of every residual layer, the opening layer and the
    classifier. Theory: :doc:`/theory/resnet`.

    Attributes
    ----------
    K : ndarray, shape (N, d, d)
        Residual-layer weights ``K_n``.
    b : ndarray, shape (N, d)
        Residual-layer biases ``b_n``.
    K_in : ndarray, shape (d, d_in), or None
        Opening-layer weight (None for an identity opening).
    b_in : ndarray, shape (d,), or None
        Opening-layer bias.
    W : ndarray, shape (C, d)
        Classifier weight.
    mu : ndarray, shape (C,)
        Classifier bias.

    A ``Params`` is a read-only mapping from the keys of :data:`PARAM_KEYS` (those
    that are not None) to arrays, so ``dict(params)`` is the plain-dict form;
    :meth:`from_dict` is its inverse. Gradients have the same type and layout.
    """

    K: np.ndarray
    b: np.ndarray
    K_in: np.ndarray | None
    b_in: np.ndarray | None
    W: np.ndarray
    mu: np.ndarray

    # Mapping protocol ---------------------------------------------------------
    def __getitem__(self, key: str) -> np.ndarray:
        if key not in PARAM_KEYS or getattr(self, key) is None:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return (k for k in PARAM_KEYS if getattr(self, k) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    __hash__ = None  # type: ignore[assignment]  # mutable arrays

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        return list(self) == list(other) and all(np.array_equal(self[k], other[k]) for k in self)

    # Conversions ----------------------------------------------------------------
    def to_dict(self, copy: bool = True) -> dict[str, np.ndarray]:
        """Plain ``dict`` of arrays with keys ``K, b, [K_in, b_in,] W, mu``."""
        return {k: (v.copy() if copy else v) for k, v in self.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, np.ndarray]) -> Params:
        """Inverse of :meth:`to_dict`; missing ``K_in``/``b_in`` mean an identity opening.

        No validation against a network happens here; use :meth:`ResNet.check_params`.
        """
        unknown = set(d) - set(PARAM_KEYS)
        if unknown:
            raise ValueError(f"unknown parameter keys {sorted(unknown)}; valid keys {PARAM_KEYS}")
        return cls(**{f.name: (None if d.get(f.name) is None else np.asarray(d[f.name]))
                      for f in fields(cls)})

    def copy(self) -> Params:
        """Deep copy."""
        return Params(**{f.name: (None if getattr(self, f.name) is None
                                  else getattr(self, f.name).copy()) for f in fields(self)})

    def ravel(self) -> np.ndarray:
        """All parameters as one flat vector, in the order of :data:`PARAM_KEYS`."""
        return np.concatenate([v.ravel() for v in self.values()])

    def unravel(self, vector: np.ndarray) -> Params:
        """Parameters of the same shapes as ``self`` filled from a flat ``vector``."""
        vector = np.asarray(vector)
        sizes = [v.size for v in self.values()]
        if vector.shape != (sum(sizes),):
            raise ValueError(f"vector has shape {vector.shape}, expected ({sum(sizes)},)")
        out, start = {}, 0
        for (k, v), n in zip(self.items(), sizes, strict=True):
            out[k] = vector[start:start + n].reshape(v.shape).astype(v.dtype, copy=True)
            start += n
        return Params.from_dict(out)

    def norm(self) -> float:
        """Euclidean norm of all parameters together."""
        return float(np.sqrt(sum(float(np.vdot(v, v)) for v in self.values())))
