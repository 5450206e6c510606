#!/usr/bin/env bash
# The GPU check in one call that ends by itself within BUDGET seconds (default 500), from the repository
# root of a machine with an NVIDIA GPU:
#
#   BUDGET=540 benchmarks/gpu_check.sh
#
# Steps, in order of value; each has its own cap (CAP_<step>=seconds overrides it) under one shared deadline,
# and a step that would start with less than MIN_STEP seconds left is skipped:
#   build      load the prebuilt extension (build/device, from `make device-build`), else build it here
#              (setup.py build_ext --inplace, MAX_JOBS=16); every op must report a CUDA kernel
#   exercise   benchmarks/cuda_exercise.py: every CUDA kernel path against the float64/CPU reference
#   perf       benchmarks/gpu_perf.py: bandwidth ceilings, GEMM vs cuBLAS, ops vs eager, CUDA graphs
#   memcheck   compute-sanitizer memcheck over cuda_exercise.py, without the caching allocator
#   racecheck  compute-sanitizer racecheck over cuda_exercise.py --quick (the kernels with shared memory)
#   pytest     the CUDA tests of the pytest suite (-k cuda; CPU tests are CI's job)
#   ncu        ncu --clock-control none on the GEMM kernels, if time is left
# Every log goes straight into $OUT (default ./gpu_check_out), at most 8 files and no folder, so that a call
# cut off still returns what ran: summary.txt, build.log, exercise.log, perf.log, perf.json, sanitizer.log
# (memcheck, then racecheck), pytest.log, ncu.log. Exit status: 0 when every step that ran passed.
# Then, on the machine with the checkout: python -m benchmarks.gpu_report <folder with perf.json ...>.
#
# DRY_RUN=1 runs the schedule without a GPU: each step only sleeps DRY_SLEEP_<step> seconds (default 0) and
# prints its command, so the deadline, the caps and the files in $OUT can be tested anywhere.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
PY="${PYTHON:-python3}"
BUDGET="${BUDGET:-500}"
MIN_STEP="${MIN_STEP:-15}"
DRY_RUN="${DRY_RUN:-0}"
PREBUILT="${PREBUILT:-build/device/customlayers}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"

STEPS=(build exercise perf memcheck racecheck pytest ncu)
declare -A CAP=([build]=150 [exercise]=60 [perf]=150 [memcheck]=120 [racecheck]=60 [pytest]=90 [ncu]=60)
declare -A LOG=([build]=build.log [exercise]=exercise.log [perf]=perf.log [memcheck]=sanitizer.log
                [racecheck]=sanitizer.log [pytest]=pytest.log [ncu]=ncu.log)

# The steps' commands. build_extension runs as `gpu_check.sh --build` so that `timeout` can stop it.
command_of() {
  case "$1" in
    build) echo bash benchmarks/gpu_check.sh --build ;;
    exercise) echo "$PY" benchmarks/cuda_exercise.py ;;
    perf) echo "$PY" -m benchmarks.gpu_perf --out "$OUT/perf.json" ;;
    memcheck) echo env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
                   "$PY" benchmarks/cuda_exercise.py ;;
    racecheck) echo compute-sanitizer --tool racecheck --error-exitcode 1 "$PY" benchmarks/cuda_exercise.py --quick ;;
    pytest) echo env CUSTOMLAYERS_EXPECT_EXTENSION=1 CUSTOMLAYERS_EXPECT_CUDA=1 "$PY" -m pytest tests -q -ra -k cuda ;;
    ncu) echo ncu --clock-control none --kernel-name "regex:gemm_(simt|wmma)_kernel|split_k_reduce" --launch-count 8 \
              "$PY" -m benchmarks.gpu_perf --only gemm --once --out /tmp/gpu_check_ncu_perf.json ;;
  esac
}

# The prebuilt extension (the core _C*.so and its CPU tiers' libcustomlayers_cpu_*.so) if it loads with every
# CUDA kernel, else a build here.
build_extension() {
  if compgen -G "$PREBUILT/_C*.so" >/dev/null && [ -f "$PREBUILT/_build_info.py" ]; then
    echo "prebuilt extension: $PREBUILT"
    cp "$PREBUILT"/*.so "$PREBUILT/_build_info.py" customlayers/
    "$PY" benchmarks/cuda_exercise.py --report && return 0
    echo "the prebuilt extension is not usable here: building it"
  else
    echo "no prebuilt extension in $PREBUILT: building it"
  fi
  rm -f customlayers/*.so customlayers/_build_info.py
  "$PY" setup.py build_ext --inplace && "$PY" benchmarks/cuda_exercise.py --report
}

if [ "${1:-}" = --build ]; then
  build_extension
  exit
fi
[ $# -eq 0 ] || { echo "usage: [BUDGET=seconds] [DRY_RUN=1] $0" >&2; exit 2; }

# The commit measured (perf.json records it too): git's, where the checkout has its .git, else as given.
if commit=$(git rev-parse HEAD 2>/dev/null); then
  git diff --quiet HEAD 2>/dev/null || commit="$commit (with local changes)"
  export GPU_CHECK_COMMIT="$commit"
fi
export GPU_CHECK_COMMIT="${GPU_CHECK_COMMIT:-unknown}"
mkdir -p "$OUT"
summary="$OUT/summary.txt"
: >"$summary"
for step in "${STEPS[@]}"; do : >"$OUT/${LOG[$step]}"; done
deadline=$((SECONDS + BUDGET))
failed=0

say() { echo "$*" | tee -a "$summary"; }

run_step() {  # run_step NAME: under min(its cap, time left), output appended to its log
  local name=$1 left=$((deadline - SECONDS)) cap_var="CAP_$1"
  local cap=${!cap_var:-${CAP[$1]}}
  local log="$OUT/${LOG[$name]}"
  if [ $left -lt "$MIN_STEP" ]; then
    say "$name: skipped (${left} s left of the budget)"
    return 1
  fi
  [ "$cap" -le "$left" ] || cap=$left
  local cmd
  cmd=$(command_of "$name")
  echo "=== $name (cap ${cap} s): $cmd" >>"$log"
  local start=$SECONDS rc
  if [ "$DRY_RUN" = 1 ]; then
    local sleep_var="DRY_SLEEP_$name"
    timeout --kill-after=5 "$cap" sleep "${!sleep_var:-0}" >>"$log" 2>&1
    rc=$?
    echo "dry run: $cmd" >>"$log"
  else
    # shellcheck disable=SC2086  # the command's words, as command_of printed them
    timeout --kill-after=5 "$cap" $cmd >>"$log" 2>&1
    rc=$?
  fi
  local took=$((SECONDS - start))
  if [ "$name" = ncu ] && [ $rc -ne 0 ] && grep -q ERR_NVGPUCTRPERM "$log"; then
    say "ncu: skipped (no permission for the GPU's performance counters)"
    return 0
  fi
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    say "$name: TIMED OUT after ${took} s (cap ${cap} s), log ${LOG[$name]}"
  elif [ $rc -ne 0 ]; then
    say "$name: FAILED rc=$rc (${took} s), log ${LOG[$name]}"
  else
    say "$name: ok (${took} s)"
  fi
  if [ $rc -ne 0 ]; then
    failed=1
    tail -n 25 "$log" | sed 's/^/    /' >>"$summary"
  fi
  return $rc
}

{
  echo "gpu_check.sh: budget ${BUDGET} s$([ "$DRY_RUN" = 1 ] && echo ', dry run')"
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "commit: $GPU_CHECK_COMMIT"
  if [ "$DRY_RUN" != 1 ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/gpu: /'
    "$PY" -c 'import torch; print("torch:", torch.__version__, "cuda:", torch.version.cuda)'
  fi
} >>"$summary" 2>&1

for step in "${STEPS[@]}"; do
  if ! run_step "$step" && [ "$step" = build ]; then
    failed=1
    say "no usable extension with CUDA kernels: nothing else can run"
    break
  fi
done
say "total: $SECONDS s of ${BUDGET} s; $([ $failed = 0 ] && echo 'every step that ran passed' || echo 'FAILURES above')"
exit $failed
