#!/usr/bin/env bash
# GPU check, run on a machine with an NVIDIA GPU from the repository root:
#   benchmarks/gpu_check.sh [STEP ...]     (default: tests sanitizer bench)
# Every call first builds (pip install -e with the machine's torch; incremental, so a warm machine only
# recompiles what changed). Steps: build (nothing more), tests (the pytest suite, CUDA tests included),
# sanitizer (compute-sanitizer memcheck and racecheck over every CUDA kernel, benchmarks/cuda_exercise.py),
# bench (every op) or bench:OP (one op: centered, masked_uniform_, linear_act). Steps can be split over
# several calls. Output in $OUT (default ./gpu_check_out): summary.txt (appended to), logs-<time>.tar.gz
# and, after a bench step, results.tar.gz (all of benchmarks/results/<gpu>/).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(tests sanitizer bench)
for what in "${steps[@]}"; do
  case "$what" in
    build | tests | sanitizer | bench | bench:centered | bench:masked_uniform_ | bench:linear_act) ;;
    *) echo "unknown step: $what (build, tests, sanitizer, bench, bench:OP)" >&2; exit 2 ;;
  esac
done

stamp=$(date -u +%Y%m%dT%H%M%SZ)-$$
logs="$OUT/logs-$stamp"
mkdir -p "$logs"
summary="$OUT/summary.txt"
failed=0
benched=0
finish() {  # on every exit: archive the logs and, after a bench step, the results
  if [ $benched = 1 ]; then
    gpu_dir=$($PY -c 'import torch; from benchmarks.harness import device_name; print(device_name(torch.device("cuda")))')
    tar -czf "$OUT/results.tar.gz" -C benchmarks/results "$gpu_dir"
  fi
  tar -czf "$logs.tar.gz" -C "$OUT" "$(basename "$logs")" && rm -rf "$logs"
}
trap finish EXIT
step() {  # step NAME COMMAND...: run, log, record status
  local name=$1; shift
  local start=$SECONDS
  "$@" >"$logs/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc ($((SECONDS - start)) s)" | tee -a "$summary"
  [ $rc -eq 0 ] || failed=1
  return $rc
}

{
  echo "--- gpu_check.sh ${steps[*]}"
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/gpu: /'
  $PY -c 'import torch; print("torch:", torch.__version__, "cuda:", torch.version.cuda)'
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
} >>"$summary" 2>&1

step build $PY -m pip install --no-build-isolation --no-deps -v -e . || { tail -50 "$logs/build.log"; exit 1; }
for what in "${steps[@]}"; do
  case "$what" in
    build) ;;
    tests) step tests env CUSTOMLAYERS_EXPECT_EXTENSION=1 CUSTOMLAYERS_EXPECT_CUDA=1 $PY -m pytest tests -q -ra ;;
    sanitizer)
      for tool in memcheck racecheck; do
        step "sanitizer-$tool" compute-sanitizer --tool "$tool" --error-exitcode 1 $PY benchmarks/cuda_exercise.py
      done ;;
    bench) benched=1; step bench $PY -m benchmarks.run --device cuda ;;
    bench:*) benched=1; step "bench-${what#bench:}" $PY -m benchmarks.run --device cuda --ops "${what#bench:}" ;;
  esac
done
cat "$summary"
exit $failed
