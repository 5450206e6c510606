#!/usr/bin/env bash
# GPU check, run on a machine with an NVIDIA GPU from the repository root:
#   build with the machine's torch, run the test suite (CUDA tests included), run compute-sanitizer
#   (memcheck, racecheck) on every CUDA kernel, run the benchmarks. Everything goes to $OUT
#   (default: ./gpu_check_out): summary.txt, logs.tar.gz and results.tar.gz (benchmarks/results/<gpu>/).
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
  return $rc
}

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/gpu: /'
  $PY -c 'import torch; print("torch:", torch.__version__, "cuda:", torch.version.cuda)'
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
} >>"$summary" 2>&1

step build $PY -m pip install --no-build-isolation --no-deps -v -e . || { tail -50 "$OUT/logs/build.log"; exit 1; }
step tests env CUSTOMLAYERS_EXPECT_EXTENSION=1 CUSTOMLAYERS_EXPECT_CUDA=1 $PY -m pytest tests -q -ra
for tool in memcheck racecheck; do
  step "sanitizer-$tool" compute-sanitizer --tool "$tool" --error-exitcode 1 $PY benchmarks/cuda_exercise.py
done
step bench $PY -m benchmarks.run --device cuda

gpu_dir=$($PY -c 'import torch; from benchmarks.harness import device_name; print(device_name(torch.device("cuda")))')
tar -czf "$OUT/results.tar.gz" -C benchmarks/results "$gpu_dir"
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$OUT/logs"
cat "$summary"
