#!/usr/bin/env bash
# On a CUDA GPU machine: install the carried wheels (tools/gpu_wheels.sh made them in .whl/), run the CUDA test selection
# with the shared-guarantee suites on the GPU, then bench/gpu.py; logs and results go to OUT (at most 8 files, flat).
#   bash tools/gpu_check.sh OUT
# Steps and limits (the whole run stays well inside 10 minutes on an H200):
#   install   the wheels into $GPU_SITE (default /tmp/site), offline, no dependencies resolved (they are all carried)
#   tests     FASTSPARSE_TEST_DEVICE=cuda pytest -m 'cuda or not slow' on tests/test_cuda.py, test_training.py,
#             test_exactness.py and the other `cuda` tests; stopped after $GPU_TEST_TIMEOUT seconds (default 240)
#   bench     python bench/gpu.py --budget $GPU_BENCH_BUDGET (default 240) --write-result bench/results/gpu.md (the
#             Benchmarks page's section, also copied to OUT/gpu.md); stopped after the budget plus 60 seconds
# Files in OUT: gpu_check.log (the steps, their times and exit codes), env.log, tests.log, tests.xml (JUnit), bench.log, gpu.md.
# The exit code is 0 only when every step passed.
# GPU_CHECK_DRY=1 checks this script where there is no GPU: no install, the tests on the CPU (the `cuda` tests skip with
# their reason), and `bench/gpu.py --quick --device cpu`. FASTSPARSE_COMMIT=<sha> stamps the result where git is absent.
set -uo pipefail
OUT=${1:?usage: bash tools/gpu_check.sh OUTDIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}
SITE=${GPU_SITE:-/tmp/site}
DRY=${GPU_CHECK_DRY:-}
TEST_TIMEOUT=${GPU_TEST_TIMEOUT:-240}
BENCH_BUDGET=${GPU_BENCH_BUDGET:-240}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export CUBLAS_WORKSPACE_CONFIG=:4096:8   # cuBLAS picks the same kernels run after run: the resume test compares two runs exactly
T0=$SECONDS
status=0
log() { echo "[gpu_check $((SECONDS - T0)) s] $*" | tee -a "$OUT/gpu_check.log"; }
step() {  # step NAME LOGFILE COMMAND...: run, log the exit code, remember a failure
    local name=$1 file=$2; shift 2
    log "$name: $*"
    "$@" > "$OUT/$file" 2>&1
    local rc=$?
    log "$name: exit $rc"
    [ $rc -eq 0 ] || status=1
    return $rc
}
: > "$OUT/gpu_check.log"
log "start in $REPO${DRY:+ (GPU_CHECK_DRY: no install, CPU only)}"

if [ -z "$DRY" ]; then
    if ! ls .whl/*.whl > /dev/null 2>&1; then log "install: no wheels in .whl/ (run tools/gpu_wheels.sh here and carry .whl)"; exit 2; fi
    step install install.log "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || { cat "$OUT/install.log"; exit 2; }
    rm -f "$OUT/install.log"
    export PYTHONPATH=$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}   # the checkout's code first: the project's wheel gives metadata only
    DEVICE=cuda
else
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
    DEVICE=cpu
fi

step env env.log "$PY" - <<'PYEOF'
import importlib.metadata as md, platform, sys, torch
import fastsparse
print(f"python {platform.python_version()} at {sys.executable}; fastsparse from {fastsparse.__file__}")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, GPU: "
      + (', '.join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) if torch.cuda.is_available() else 'none'))
for d in ('fastai', 'fastcore', 'fasttransform', 'fastprogress', 'plum-dispatch', 'torch-pruning', 'fasterai', 'torchvision',
          'numpy', 'pandas', 'scikit-learn', 'pytest', 'pytest-xdist', 'hypothesis'):
    try: print(f"{d} {md.version(d)}")
    except md.PackageNotFoundError: print(f"{d} not installed")
import fastai.basics, fastsparse.all   # the library imports with what is installed
PYEOF
[ $? -eq 0 ] || { cat "$OUT/env.log"; exit 2; }

# the CUDA test selection: the suites that follow FASTSPARSE_TEST_DEVICE, the GPU tests, and the other tests marked `cuda`
TESTS=(tests/test_cuda.py tests/test_training.py tests/test_exactness.py
       tests/test_callback.py::test_fp16_gpu_masks_hold tests/test_export.py::test_semi_structured_on_gpu
       tests/test_export.py::test_csr_on_gpu tests/test_dst.py::test_drop_and_grow_on_gpu_tensors_if_available)
XDIST=()
if "$PY" -c 'import xdist' 2> /dev/null; then XDIST=(-n 6 --dist load); fi
TEST_ENV=(OMP_NUM_THREADS=2)   # several test processes share the CPU cores
[ -z "$DRY" ] && TEST_ENV+=(FASTSPARSE_TEST_DEVICE=cuda)
step tests tests.log env "${TEST_ENV[@]}" timeout "$TEST_TIMEOUT" "$PY" -m pytest -m 'cuda or not slow' -q -rs -p no:cacheprovider \
    "${XDIST[@]}" --junitxml="$OUT/tests.xml" "${TESTS[@]}"
tail -n 15 "$OUT/tests.log" | tee -a "$OUT/gpu_check.log"

BENCH=(bench/gpu.py --budget "$BENCH_BUDGET" --write-result bench/results/gpu.md)
[ -n "$DRY" ] && BENCH=(bench/gpu.py --quick --device cpu --write-result "$OUT/gpu.md")   # (no result file in the checkout)
step bench bench.log timeout $((${BENCH_BUDGET%.*} + 60)) "$PY" "${BENCH[@]}"
[ -z "$DRY" ] && [ -f bench/results/gpu.md ] && cp bench/results/gpu.md "$OUT/gpu.md"
tail -n 5 "$OUT/bench.log" | tee -a "$OUT/gpu_check.log"
log "done: $([ $status -eq 0 ] && echo 'every step passed' || echo 'a step failed'); files: $(cd "$OUT" && ls | tr '\n' ' ')"
exit $status
