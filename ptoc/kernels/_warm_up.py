"""The warm-up workloads of :mod:`ptoc.kernels._cache`: small runs, each compiling what
one kind of run needs (its group of kernels), run by name in helper processes, several
at once, the first time a process needs a kernel of that group.

Nothing imports this module by its name in the source (the helper does, with
:func:`importlib.import_module`): it uses the whole package, which the kernel modules,
and so :mod:`ptoc.kernels._cache`, must not depend on.
"""

from __future__ import annotations

#: Whether the kernel whose compilation started this helper runs on the sample-major rows
#: (width 8 or 16, a batch of whole vectors: ``ptoc solve`` and the ranks of ``mpiexec
#: -n 2 ptoc solve``; set by the helper). Such a caller runs no tile level kernel, so the
#: level warm-ups compile the rows kernels only (one-thread variants, the fused passes
#: on one thread, the parallel variants on more); where it later needs a tile kernel
#: (another width), that one compiles then.
CALLER_ROWS: bool = False


def _threads() -> int:
    """Numba's thread count here: the helper runs its workloads on the caller's."""
    import numba

    return numba.get_num_threads()


def _tiny_problem(depth: int = 8, width: int = 4, batch: int = 6) -> tuple:
    """A float64 ResNet of ``width`` (4: the tile kernels; 8 or 16 with a batch of whole
    vectors: the sample-major rows), its parameters, ``batch`` inputs and their
    labels."""
    import numpy as np

    import ptoc

    net = ptoc.ResNet(width=width, depth=depth, n_in=2, n_classes=3)
    X = np.random.default_rng(0).standard_normal((batch, 2))
    return net, net.init_params(0), X, np.arange(batch) % 3


def _warm_up_forward() -> None:
    """The forward sweep of training and evaluation, and the tile adjoint sweep's sum of
    gradient partials: their one-thread variants, which small jobs such as the default
    ``ptoc train`` run (the parallel ones compile when a larger sweep first needs them,
    ``ptoc._config.CPU_PARALLEL_MIN_WORK``)."""
    import ptoc

    net, params, X, _ = _tiny_problem()
    ptoc.predict(net, params, X, target="cpu")
    # width 8 with a batch of whole vectors runs the sweep on sample-major rows (the
    # default ``ptoc train`` network is 8 wide)
    import numpy as np

    from ptoc.kernels import cpu

    cpu.forward_sweep(np.zeros((2, 8, 8)), np.zeros((1, 8, 8)), np.zeros((1, 8)), 0.1, 0,
                      np.zeros((1, 8, 8)), 32)
    # the tile adjoint sweep's second kernel (batches of several work items), a top-level
    # one: the default run does not call it, but leaving it out was not measurably faster
    # (a first ``ptoc train`` compiled for 6.7 s without it, 6.3 with it, single runs
    # that move by about a second)
    part_K, part_b = np.zeros((1, 1, 4, 4)), np.zeros((1, 1, 4))
    cpu._add_partials_one_thread(part_K, part_b, np.zeros((1, 4, 4)), np.zeros((1, 4)), 0, 1)


def _warm_up_adjoint() -> None:
    """The adjoint sweep of training and ``loss_and_grad`` on the default network, 8
    wide, which keeps ``sigma'`` from its forward sweep: the one-thread sweep on
    sample-major rows (whatever the batch). Other widths, or a sweep that recomputes
    ``sigma'``, run the tile kernels, which compile when first needed."""
    import numpy as np

    from ptoc.kernels import cpu

    S, d = 8, 8
    cpu.adjoint_sweep(np.zeros((2, S, d)), np.zeros((S, d)), np.zeros((1, d, d)),
                      np.zeros((1, d)), 0.1, 0, np.zeros((1, S, d)), np.zeros((1, d, d)),
                      np.zeros((1, d)), None, 32)


def _mgrit_problem() -> tuple:
    """The tiny problem of :func:`_tiny_problem`, 32 layers, on the kernels the caller
    runs (:data:`CALLER_ROWS`: width 16 and a batch of 8, else width 4), MGRIT's
    defaults and one rank."""
    import ptoc
    from ptoc.parallel import SingleRank

    shape = dict(width=16, batch=8) if CALLER_ROWS else {}
    return (*_tiny_problem(depth=32, **shape), ptoc.MGRIT(), SingleRank())


def _level_arrays(n: int = 4, S: int = 6, d: int = 4) -> tuple:
    """Float64 arrays shaped as one level's: values, weights, step sizes, and the CPU
    kernel module."""
    import numpy as np

    from ptoc.kernels import cpu

    rng = np.random.default_rng(0)
    u, K = rng.standard_normal((n, S, d)), rng.standard_normal((n, d, d))
    return cpu, u, K, np.zeros((n, d)), np.full(n, 0.1)


def _warm_up_level_states() -> None:
    """An MGRIT forward solve: the state level kernels and the grid transfers (on one
    rank, which holds every level alone: the fused passes); then the derivatives of an
    adjoint level, which the adjoint part (the longer) needs first and may find in the
    cache by then. A caller on the rows (:data:`CALLER_ROWS`) also gets the kernels of a
    level shared with other ranks (runs, points, correction, sums of squares), and no
    tile kernel."""
    from ptoc.parallel.driver import parallel_forward

    net, params, X, _, solver, comm = _mgrit_problem()
    parallel_forward(net, params, X, solver, comm=comm)
    if not CALLER_ROWS:
        cpu, u, K, b, _ = _level_arrays()
        cpu.level_derivatives(u, K, b, 0, u.copy(), 32)
        return
    import numpy as np

    from ptoc.kernels import rows

    cpu, u, K, b, dt = _level_arrays(S=8, d=16)
    idx = np.array([1, 2], dtype=np.int64)
    cpu.state_runs(u, None, K, b, dt, 0, idx, idx, 32)
    cpu.state_points_into(u, K, b, dt, 0, idx, u[:2].copy(), idx, u, 0, 32)
    if _threads() > 1:  # the parallel variants, which a larger level of the caller runs
        cpu._state_runs_rows_parallel(u, u, False, K, b, dt, 0, idx, idx, 2)
        cpu._state_points_rows_parallel(u, K, b, dt, 0, idx, u[:2].copy(), idx, u, 0, 2)
    cpu.level_derivatives(u, K, b, 0, u.copy(), 32)
    rows.correct(u, idx, u[:2].copy(), u[:2].copy(), np.array([0, 1], dtype=np.int64))
    rows.sumsq_diff(u, idx, u, idx)


def _warm_up_level_adjoints() -> None:
    """An MGRIT adjoint solve (states from NumPy) on one rank: the adjoint level kernels,
    the layer gradients and the grid transfers; a caller on the rows
    (:data:`CALLER_ROWS`) also gets the adjoint runs and points of a level shared with
    other ranks, and no tile kernel."""
    import ptoc
    from ptoc.objective import classifier_loss
    from ptoc.parallel.driver import parallel_adjoint

    if CALLER_ROWS:
        import numpy as np

        cpu, u, K, _, dt = _level_arrays(S=8, d=16)
        idx = np.array([1, 2], dtype=np.int64)
        D = u.copy()
        cpu.adjoint_runs(u, None, D, K, dt, idx, idx, 32)
        cpu.adjoint_points_into(u, D, K, dt, idx, u[:2].copy(), idx, u, 0, 32)
        if _threads() > 1:
            cpu._adjoint_runs_rows_parallel(u, u, False, D, K, dt, idx, idx, 2)
            cpu._adjoint_points_rows_parallel(u, D, K, dt, idx, u[:2].copy(), idx, u, 0, 2)
    net, params, X, y, solver, comm = _mgrit_problem()
    states = ptoc.forward(net, params, X, target="numpy").states
    lam_N = classifier_loss(params, states[-1], y)[1]
    parallel_adjoint(net, params, states, lam_N, solver, comm=comm)


def _conv_problem() -> tuple:
    import numpy as np

    import ptoc

    net = ptoc.ConvResNet(2, 4, image_shape=(1, 5, 5), n_classes=3)
    X = np.random.default_rng(0).random((6, 25))
    return net, net.init_params(0), X, np.arange(6) % 3


def _warm_up_conv_gradient() -> None:
    """The convolutional ResNet's serial gradient (a ``ptoc train --model conv`` step and
    its evaluation)."""
    import ptoc

    net, params, X, y = _conv_problem()
    ptoc.loss_and_grad(net, params, X, y, target="cpu")


def _warm_up_conv_levels() -> None:
    """An MGRIT gradient of the convolutional ResNet: its level kernels."""
    import ptoc

    net, params, X, y = _conv_problem()
    ptoc.loss_and_grad(net, params, X, y, target="cpu", solver=ptoc.MGRIT(coarsening=2))
