#!/usr/bin/env bash
# GPU check, run on a machine with an NVIDIA GPU from the repository root:
#   benchmarks/gpu_check.sh [STEP ...]     (default: build tests sanitizer bench)
# Steps: build (pip install -e with the machine's torch), tests (the pytest suite, CUDA tests included),
# sanitizer (compute-sanitizer memcheck and racecheck over every CUDA kernel, benchmarks/cuda_exercise.py),
# bench (every op) or bench:OP (one op: centered, masked_uniform_, linear_act). Every step after build
# builds first if the extension is missing, so steps can be split over several calls. Everything goes to
# $OUT (default ./gpu_check_out): summary.txt, logs.tar.gz and, after a bench step, results.tar.gz
# (benchmarks/results/<gpu>/).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT/logs"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
summary="$OUT/summary.txt"
: >"$summary"
step() {  # step NAME COMMAND...: run, log, record status
  local name=$1; shift
  local start=$SECONDS
  "$@" >"$OUT/logs/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc ($((SECONDS - start)) s)" | tee -a "$summary"
  [ $rc -eq 0 ] || failed=1
  return $rc
}
built() { $PY -c 'import customlayers, sys; sys.exit(customlayers.backend_report()["ops"]["linear_act"]["cuda"] != "kernel")' 2>/dev/null; }
build() {
  step build $PY -m pip install --no-build-isolation --no-deps -v -e . || { tail -50 "$OUT/logs/build.log"; exit 1; }
}

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/gpu: /'
  $PY -c 'import torch; print("torch:", torch.__version__, "cuda:", torch.version.cuda)'
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
} >>"$summary" 2>&1

failed=0
benched=0
for s in "${@:-build tests sanitizer bench}"; do
  for what in $s; do
    [ "$what" = build ] || built || build
    case "$what" in
      build) build ;;
      tests) step tests env CUSTOMLAYERS_EXPECT_EXTENSION=1 CUSTOMLAYERS_EXPECT_CUDA=1 $PY -m pytest tests -q -ra ;;
      sanitizer)
        for tool in memcheck racecheck; do
          step "sanitizer-$tool" compute-sanitizer --tool "$tool" --error-exitcode 1 $PY benchmarks/cuda_exercise.py
        done ;;
      bench) step bench $PY -m benchmarks.run --device cuda && benched=1 ;;
      bench:*) step "bench-${what#bench:}" $PY -m benchmarks.run --device cuda --ops "${what#bench:}" && benched=1 ;;
      *) echo "unknown step: $what" | tee -a "$summary"; exit 2 ;;
    esac
  done
done

if [ $benched = 1 ]; then
  gpu_dir=$($PY -c 'import torch; from benchmarks.harness import device_name; print(device_name(torch.device("cuda")))')
  tar -czf "$OUT/results.tar.gz" -C benchmarks/results "$gpu_dir"
fi
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$OUT/logs"
cat "$summary"
exit $failed
