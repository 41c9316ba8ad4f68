#!/usr/bin/env bash
# Every GPU check and benchmark of dsv4 in one command, for a short lease of a GPU machine.
#
#   bash scripts/gpu_session.sh                 # all stages, in the order below (~13 min at most)
#   bash scripts/gpu_session.sh env pallas train         # ~6 min at most: one call
#   bash scripts/gpu_session.sh forward parity sharding  # ~7 min at most: a second call
#   bash scripts/gpu_session.sh sweep                    # block sizes of the attention kernels
#
# The limits come from the first run (one H200, jax 0.11.2): XLA's GPU compiles took 20-45 s per
# program there, so each stage is sized for its compiles, not its timed work.
#
# Run from the repository root on the GPU machine. Each stage runs under its own time limit (a
# stage that hangs or fails costs only its own slot), and its output goes to the terminal and to
# $OUT/<stage>.log ($OUT defaults to ./gpu_logs). Wheels in .whl/ (a newer flax or transformers
# than the machine has) are installed into /tmp/site first, without network.
#
# Stages: env (versions, device), pallas (kernels vs references, then timed at Flash sizes against
# the XLA path), train (bench_train on the GPU, with MFU), forward (bench_forward, both sides on the
# GPU), parity (tests/test_parity.py on the GPU: float32 parity with transformers, matmuls in true
# float32), sharding (bench_sharding's single-device decode step per strategy), sweep (not in the
# default list: pallas_kernels/bench.py --sweep).
set -u
out=${OUT:-gpu_logs}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi

stage() {  # stage NAME LIMIT_SECONDS COMMAND...
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo "===== $name (limit ${limit} s) $(date -u +%T)"
    timeout -k 5 "$limit" "$@" 2>&1 | tee "$out/$name.log"
    rc=${PIPESTATUS[0]}
    echo "===== $name: exit $rc after $(($(date +%s) - start)) s"
}

# JAX computes float32 matmuls in TF32 on this GPU by default, torch in float32: parity and the
# float32 benchmark rows ask JAX for true float32 so both sides do the same arithmetic.
f32=(env JAX_DEFAULT_MATMUL_PRECISION=float32)
versions="import sys, jax, flax, torch, transformers
print(sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__,
      'transformers', transformers.__version__)
print(jax.devices())"

run_stage() {
    case $1 in
        env) stage env 30 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
            --format=csv; python3 -c "$1"' env "$versions" ;;
        pallas) stage pallas 200 python3 pallas_kernels/bench.py --iters 5 ;;
        train) stage train 150 "${f32[@]}" python3 scripts/bench_train.py --warmup 2 --steps 5 --timeout 120 \
            --dsv4-dtypes bfloat16 --full-loss-dtypes --hf-dtypes float32 bfloat16 ;;
        forward) stage forward 150 "${f32[@]}" python3 scripts/bench_forward.py --repeats 3 --timeout 70 ;;
        parity) stage parity 150 "${f32[@]}" python3 -m pytest -q -x -p no:cacheprovider tests/test_parity.py ;;
        sharding) stage sharding 120 python3 scripts/bench_sharding.py --steps 50 ;;
        sweep) stage sweep 300 python3 pallas_kernels/bench.py --sweep --iters 5 ;;
        *) echo "unknown stage: $1 (env pallas train forward parity sharding sweep)" >&2; return 2 ;;
    esac
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(env pallas train forward parity sharding)
for s in "${stages[@]}"; do
    run_stage "$s"
done
