#!/usr/bin/env bash
# Every GPU check of the project in one run on a CUDA machine, each step under its own time limit so that one
# step that hangs or fails leaves the others' results.  Results go to $RES (default ./gpu_out), packed after
# every step into $OUT/gpu.tgz when $OUT is set (a device run brings back few files):
#   env.txt         GPU, driver, torch / triton / transformers versions
#   pytest.log      tests/test_runtime_cuda.py and tests/test_triton_kernels.py on the GPU
#   tune.md/.json   benchmarks/gpu_tune.py (the packed kernel's tile sweep)
#   layers.md/.json, models.md/.json   benchmarks/gpu_runtime.py (the tables of RESULTS_runtime.md)
# Usage: bash benchmarks/gpu_session.sh [step ...]   (steps: env graphtest tune layers models tests; all)
# The default limits add up to 560 s, so that every step fits one device call (at most 600 s); each can be set
# (TUNE_LIMIT=300 ...). The tile sweep stops timing 30 s before its limit and keeps what it measured.
set -u
RES=${RES:-gpu_out}
mkdir -p "$RES"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(env graphtest tune layers models tests)

run_step() {  # name, limit in seconds, command...
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@"
    echo "== step $name: rc $? in $((SECONDS - t0)) s" | tee -a "$RES/steps.txt" >&2
    if [ -n "${OUT:-}" ]; then tar czf "$OUT/gpu.tgz" -C "$RES" .; fi
}

for step in "${steps[@]}"; do
    # the benchmarks use this run's tile sweep when it produced one
    TILES=""
    [ -s "$RES/tune.json" ] && TILES="--tiles $RES/tune.json"
    case $step in
    env)
        run_step env "${ENV_LIMIT:-30}" bash -c "nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total \
            --format=csv > '$RES/env.txt'; $PY -c 'import torch, triton, transformers; \
            print(torch.__version__, torch.version.cuda, triton.__version__, transformers.__version__, \
            torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).L2_cache_size)' >> '$RES/env.txt' 2>&1"
        ;;
    tests)
        run_step tests "${TESTS_LIMIT:-75}" bash -c "$PY -m pytest -q -p no:cacheprovider -rfE \
            tests/test_runtime_cuda.py tests/test_triton_kernels.py > '$RES/pytest.log' 2>&1"
        tail -3 "$RES/pytest.log"
        ;;
    graphtest)
        run_step graphtest "${GRAPHTEST_LIMIT:-75}" bash -c "CUDA_LAUNCH_BLOCKING=1 $PY -m pytest -q -p no:cacheprovider \
            -rfE -x tests/test_runtime_cuda.py -k captured > '$RES/graphtest.log' 2>&1"
        tail -3 "$RES/graphtest.log"
        ;;
    tune)
        limit=${TUNE_LIMIT:-120}
        run_step tune "$limit" bash -c "$PY benchmarks/gpu_tune.py --seconds $((limit - 30)) --out '$RES/tune.json' \
            > '$RES/tune.md' 2> '$RES/tune.err'"
        ;;
    layers)
        run_step layers "${LAYERS_LIMIT:-140}" bash -c "$PY benchmarks/gpu_runtime.py --layers-only $TILES \
            --timings graph --out '$RES/layers.json' > '$RES/layers.md' 2> '$RES/layers.err'"
        ;;
    models)
        # MODELS_BLOCKING=1 runs it with CUDA_LAUNCH_BLOCKING=1 (a device assert then names the launching op)
        run_step models "${MODELS_LIMIT:-120}" bash -c "CUDA_LAUNCH_BLOCKING=${MODELS_BLOCKING:-0} $PY benchmarks/gpu_runtime.py --models-only $TILES \
            --steps "${MODEL_STEPS:-64}" --out '$RES/models.json' > '$RES/models.md' 2> '$RES/models.err'"
        ;;
    *) echo "unknown step $step" >&2 ;;
    esac
done
for f in tune.md models.md; do [ -s "$RES/$f" ] && tail -n 40 "$RES/$f"; done
cat "$RES/steps.txt"
