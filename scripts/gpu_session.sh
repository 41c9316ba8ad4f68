#!/usr/bin/env bash
# Every GPU check and benchmark of dsv4 in one command, for a short lease of a GPU machine.
#
#   bash scripts/gpu_session.sh                 # all stages, in the order below
#   bash scripts/gpu_session.sh pallas parity   # some stages
#
# Run from the repository root on the GPU machine. Each stage runs under its own time limit (a
# stage that hangs or fails costs only its own slot), and its output goes to the terminal and to
# $OUT/<stage>.log ($OUT defaults to ./gpu_logs). Wheels in .whl/ (a newer flax or transformers
# than the machine has) are installed into /tmp/site first, without network.
#
# Stages: env (versions, device), sharding (bench_sharding's single-device decode step per
# strategy), pallas (kernels vs references, then timed at Flash sizes against the XLA path), train
# (bench_train on the GPU, with MFU), parity (tests/test_parity.py on the GPU: float32 parity with
# transformers, matmuls in true float32), forward (bench_forward, both sides on the GPU).
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
        sharding) stage sharding 50 python3 scripts/bench_sharding.py --steps 50 ;;
        pallas) stage pallas 170 python3 pallas_kernels/bench.py --iters 5 ;;
        train) stage train 140 "${f32[@]}" python3 scripts/bench_train.py --warmup 2 --steps 5 --timeout 75 \
            --dsv4-dtypes bfloat16 float32 --full-loss-dtypes --hf-dtypes float32 bfloat16 ;;
        parity) stage parity 80 "${f32[@]}" python3 -m pytest -q -x -p no:cacheprovider tests/test_parity.py ;;
        forward) stage forward 100 "${f32[@]}" python3 scripts/bench_forward.py --repeats 5 --timeout 45 ;;
        *) echo "unknown stage: $1 (env sharding pallas train parity forward)" >&2; return 2 ;;
    esac
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(env sharding pallas train parity forward)
for s in "${stages[@]}"; do
    run_stage "$s"
done
