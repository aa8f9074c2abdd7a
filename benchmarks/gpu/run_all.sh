#!/usr/bin/env bash
# On a CUDA machine whose python3 already has torch, triton, transformers and pytest (installs
# nothing): the GPU tests and the GPU benchmarks, in under 8 minutes, results into the folder $1.
#   bash benchmarks/gpu/run_all.sh OUT
# Writes three flat files (the device tool brings back at most 8): info.json, tests.log, and
# results.tgz holding every benchmark's JSON and PNG (kernels, serve profile + serve, filter, kv speed,
# qzo memory). The step limits add up to 8 minutes; each step stops at its own limit.
# Needs on the device: transformers, accelerate (and bitsandbytes + peft for the QZO step).
set -uo pipefail
OUT=${1:?usage: run_all.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
PY=${PYTHON:-python3}
failed=()

step() {  # step NAME SECONDS LOG CMD...: time-limited, output appended to LOG and shown, failures kept
  local name=$1 limit=$2 log=$3 t0=$SECONDS rc start
  shift 3
  echo "== $name (limit ${limit}s)" | tee -a "$log"
  start=$(wc -l <"$log")
  timeout "$limit" "$@" >>"$log" 2>&1
  rc=$?
  tail -n +"$((start + 1))" "$log" | tail -n 12
  [ $rc -eq 0 ] || failed+=("$name (rc=$rc)")
  echo "== $name: rc=$rc, $((SECONDS - t0))s" | tee -a "$log"
}

"$PY" -m llmsys.cli info --json >"$OUT/info.json" 2>>"$OUT/tests.log" || failed+=("info")
cat "$OUT/info.json"
# 1. GPU-marked tests: compiled Triton kernels, CUDA cache paths, expert parallelism over NCCL (one
#    rank per GPU) and the serving engine on CUDA (TRITON_INTERPRET must be unset).
step gpu-tests 110 "$OUT/tests.log" env -u TRITON_INTERPRET "$PY" -m pytest -q -m gpu -p no:cacheprovider tests
# 2. The CPU suites of the shared layers on this machine's torch/transformers (the lent machines have
#    torch 2.11 and transformers 5.17: the lower end of the supported range), kernels in the interpreter.
step cpu-suites 40 "$OUT/tests.log" env TRITON_INTERPRET=1 "$PY" -m pytest -q -m "not gpu" -p no:cacheprovider \
  -n 8 tests/models tests/cache tests/kernels
# 3. Benchmarks with a GPU part.
RES="$OUT/results"
mkdir -p "$RES"
step kernels-bench 45 "$OUT/tests.log" env -u TRITON_INTERPRET "$PY" benchmarks/kernels.py --out "$RES"
step serve-profile 45 "$OUT/tests.log" "$PY" -m llmsys.serve.cli serve profile --out "$RES/serve_profile.json"
step serve-bench 65 "$OUT/tests.log" "$PY" benchmarks/serve.py --quick --skip-cpu --profile "$RES/serve_profile.json" \
  --out "$RES"
step filter-bench 75 "$OUT/tests.log" env -u TRITON_INTERPRET "$PY" benchmarks/filter.py --parts speed \
  --out "$RES/filter.json"
# LeoAM decode speed with the KV on CUDA (pinned host tier, side-stream prefetch, transformers offloading)
step kv-speed 45 "$OUT/tests.log" env -u TRITON_INTERPRET "$PY" benchmarks/kv_speed.py --quick --out "$RES/kv_speed.json"
# QZO peak GPU memory (max_memory_allocated) against MeZO / SGD / AdamW / LoRA
step qzo-memory 55 "$OUT/tests.log" env -u TRITON_INTERPRET "$PY" benchmarks/qzo.py --quick --skip-learning \
  --out "$RES/qzo.json"
tar -czf "$OUT/results.tgz" -C "$RES" . && rm -rf "$RES"

if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "all steps passed"
