#!/usr/bin/env bash
# The measurements of docs/benchmarks.md that need a machine with many cores (the lent
# device: 16 cores, no network), each part sized to fit one device call of at most 10 minutes.
#
#   bash benchmarks/device.sh prepare    # here, with network: wheels into .whl/ (ignored)
#   bash benchmarks/device.sh pymgrit    # there: ptoc MGRIT vs PyMGRIT, all cores
#   bash benchmarks/device.sh scaling    # there: MPI on 1, 2, 4, 8, 16 ranks vs prediction
#   bash benchmarks/device.sh cuda       # there: the CUDA kernels vs PyTorch CUDA
#
# On the device, through its `run` tool: command "bash benchmarks/device.sh pymgrit",
# carry [".whl"]. Records go to $OUT (or benchmarks/results/ when OUT is unset), named
# as the benchmarks name them. Overrides: DEPTHS (default "1024 4096 16384") and
# RANKS (default "4 8 16") for `scaling`, REPEATS for all; WIDTHS (default "64 256 512"),
# BATCHES ("10000 100000"), DEPTH (16) and BUDGET (40 s per measurement) for `cuda`.
set -euo pipefail
cd "$(dirname "$0")/.."
part=${1:-}
WHEELS=.whl
PY=${PYTHON:-python3}

prepare() {
    mkdir -p "$WHEELS"
    # PyMGRIT (pure Python; numpy, scipy, matplotlib and mpi4py are on the device), the
    # mpich wheel (mpiexec and libmpi), and mpi4py for the device's Python 3.12 in case
    # its own cannot load that libmpi
    "$PY" -m pip download -q --no-deps -d "$WHEELS" pymgrit==1.0.6
    "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$WHEELS" \
        --platform manylinux_2_28_x86_64 mpich==5.0.2
    "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$WHEELS" \
        --platform manylinux_2_17_x86_64 --platform manylinux_2_5_x86_64 \
        --python-version 3.12 mpi4py==4.1.2
    ls -l "$WHEELS"
}

setup() {
    [ -d "$WHEELS" ] || { echo "no $WHEELS/: run 'bash benchmarks/device.sh prepare' here" \
        "and carry .whl" >&2; exit 2; }
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" pymgrit mpich
    if ! "$PY" -c "from mpi4py import MPI" 2>/dev/null; then
        "$PY" -m pip install -q --no-index --find-links "$WHEELS" --force-reinstall mpi4py
    fi
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} OPENBLAS_NUM_THREADS=1
    MPIEXEC=$(dirname "$(command -v "$PY")")/mpiexec
    [ -x "$MPIEXEC" ] || MPIEXEC=$(command -v mpiexec)
    RESULTS=${OUT:-benchmarks/results}
    mkdir -p "$RESULTS"
    echo "cores: $(nproc); $("$PY" --version); mpiexec: $MPIEXEC"
    "$MPIEXEC" -n 2 "$PY" -c "from mpi4py import MPI; c = MPI.COMM_WORLD; \
        print('mpi4py', c.Get_rank(), 'of', c.Get_size(), MPI.Get_library_version()[:40])"
}

stamp=$(date +%Y%m%d-%H%M%S)
case "$part" in
    prepare)
        prepare ;;
    pymgrit)
        setup
        "$PY" benchmarks/bench_pymgrit.py --repeats "${REPEATS:-40}" \
            --output "$RESULTS/pymgrit_$stamp.json" ;;
    scaling)
        setup
        # shellcheck disable=SC2086
        "$PY" benchmarks/bench_scaling.py --depths ${DEPTHS:-1024 4096 16384} \
            --mpi-ranks ${RANKS:-4 8 16} --sim-ranks 4 8 16 32 64 \
            --repeats "${REPEATS:-3}" --launches 1 --sim-budget 240 --cold-depths \
            --mpiexec "$MPIEXEC" --output "$RESULTS/scaling_$stamp.json" ;;
    cuda)
        # shellcheck disable=SC2086
        "$PY" benchmarks/bench_cuda.py --widths ${WIDTHS:-64 256 512} \
            --batches ${BATCHES:-10000 100000} --depth "${DEPTH:-16}" \
            --repeat "${REPEATS:-3}" --budget "${BUDGET:-40}" \
            --output "${OUT:-benchmarks/results}/cuda_$stamp.json" ;;
    *)
        echo "usage: bash benchmarks/device.sh prepare|pymgrit|scaling|cuda" >&2
        exit 2 ;;
esac
