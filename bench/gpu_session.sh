#!/usr/bin/env bash
# One device call of the first GPU session (bench/GPU_SESSION.md): build, correctness, kernels.
#
#   bash bench/gpu_session.sh [phase ...]     phases: build check kernels kernels-big step loader
#
# Runs on the lent GPU machine (torch 2.11 + CUDA, nvcc, no network) in the repository root;
# everything it measures or logs goes to $OUT (or bench/results/ when OUT is unset), so that the
# device tool brings it back. Each phase has its own time limit so that one hang cannot eat the
# whole 10-minute call; the table printed last says what ran and how it ended.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(build check kernels)
summary=()

run_phase() {  # name, limit in seconds, command...
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-12s rc=%-4s %4ss  %s' "$name" "$rc" "$((SECONDS - start))" "$OUT/$name.log")")
  tail -5 "$OUT/$name.log"
  return $rc
}

for phase in "${phases[@]}"; do
  case "$phase" in
    build)
      run_phase build 420 python3 -m pip install -q --no-build-isolation --no-deps -e . ;;
    check)
      run_phase info 60 python3 -m fastipirm info
      run_phase check 240 python3 -m fastipirm check
      run_phase gpu-tests 400 env TRITON_INTERPRET=0 python3 -m pytest -q -x -m gpu \
        tests/test_triton_backend.py tests/test_cuda_backend.py ;;
    kernels)
      run_phase kernels 540 python3 -m fastipirm bench kernels --n 512 2048 8192 --envs 16 \
        --results-dir "$OUT" --plot ;;
    kernels-big)
      run_phase kernels-big 540 python3 -m fastipirm bench kernels --n 16384 --envs 2 16 \
        --results-dir "$OUT" ;;
    step)
      run_phase step 540 python3 -m fastipirm bench step --archs resnet50 --results-dir "$OUT" ;;
    loader)
      run_phase loader 400 python3 -m fastipirm bench loader --results-dir "$OUT" ;;
    *)
      echo "unknown phase: $phase (build check kernels kernels-big step loader)" >&2
      exit 2 ;;
  esac
done
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv >"$OUT/gpu.txt" 2>&1
printf '%s\n' "${summary[@]}"
