#!/usr/bin/env bash
# GPU check on the H200 machine (sm_90): GPU facts, the test suite, the benchmark sets, report.
# One-off measurement tools live in benchmarks/probes/ (docs/performance.md, method).
#
#   bash scripts/gpu_check.sh                  # from the repo root; writes to $OUT (default ./gpu_out)
#   TESTS=skip SETS=prefill FILTER='D=128' bash scripts/gpu_check.sh
#
# Runs with the machine's python3 as it is (torch+cu130, triton 3.6, pytest, hypothesis):
# no venv, no installs. Knobs (environment):
#   TESTS         pytest paths/args, word-split (default "tests"; e.g. "tests/test_triton_forward.py -k causal");
#                 "skip" skips the tests
#   MAXFAIL       stop the tests after this many failures (default 1)
#   MARK          pytest -m expression (default: none, every test runs, Triton ones on the GPU)
#   SETS          benchmark sets, in order (default "prefill decode"; "" for none)
#   PROVIDERS, MODES, FILTER   passed to benchmarks.run as --providers / --modes / --filter
#   SANITIZE      1: also run scripts/sanitize_kernels.py under compute-sanitizer (memcheck, racecheck)
#   PROBES        words, run after the tests: "verify" (tileattn verify), "eager" (per-call eager time vs
#                 SDPA, benchmarks/probes/eager_latency.py), "hf" (transformers generate() tokens/s,
#                 benchmarks/hf_generate.py); each writes $OUT/<probe>.log (and .json), 120 s cap each
#   DEADLINE      seconds for the whole script (default 530: under the 10-minute call limit)
#   TEST_TIMEOUT  cap for the test step in seconds (default 240)
# Writes $OUT/{nvidia-smi.txt,tests.log,junit.xml,<set>.json,<set>.log,report.md}; the report
# prints last. Each benchmark set may use the time left minus 90 s per later set (its
# --budget leaves 45 s of that for the measurement in flight); measurements past the budget are recorded as skipped, and the
# JSON is rewritten after every case, so a set cut short keeps what it measured. For full
# prefill numbers give it a call of its own: TESTS=skip SETS=prefill.
# Exit status: 1 when the tests failed or timed out, else 0 (benchmarks never fail the run).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-gpu_out}
TESTS=${TESTS:-tests}
MARK=${MARK-}
SETS=${SETS-prefill decode}
DEADLINE=${DEADLINE:-530}
TEST_TIMEOUT=${TEST_TIMEOUT:-240}
mkdir -p "$OUT"
start=$SECONDS
left() { echo $((DEADLINE - (SECONDS - start))); }

echo "== GPU"
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,power.limit \
  --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
'cudnn', torch.backends.cudnn.version(), 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$OUT/nvidia-smi.txt"

status=0
if [ "$TESTS" != skip ]; then
  read -ra test_args <<<"$TESTS"
  mark_args=()
  [ -n "$MARK" ] && mark_args=(-m "$MARK")
  nsets=$(wc -w <<<"$SETS")
  t=$(($(left) - 90 * nsets))
  [ "$t" -gt "$TEST_TIMEOUT" ] && t=$TEST_TIMEOUT
  [ "$t" -lt 30 ] && t=30
  echo "== tests (timeout ${t}s): pytest ${mark_args[*]} ${test_args[*]} --maxfail=${MAXFAIL:-1} -q -n 16"
  timeout -k 10 "$t" python3 -m pytest ${mark_args[@]+"${mark_args[@]}"} "${test_args[@]}" --maxfail="${MAXFAIL:-1}" -q -n 16 -p no:cacheprovider \
    --junitxml="$OUT/junit.xml" >"$OUT/tests.log" 2>&1
  rc=$?
  tail -n 25 "$OUT/tests.log"
  if [ "$rc" -eq 5 ]; then
    echo "tests: none selected (pytest rc 5)"
  elif [ "$rc" -ne 0 ]; then
    status=1
    [ "$rc" -ge 124 ] && echo "tests: TIMED OUT after ${t}s (rc $rc)" || echo "tests: FAILED (rc $rc)"
  fi
fi

if [ "${SANITIZE:-0}" = 1 ]; then  # every kernel variant once under memcheck; decode + combine under racecheck
  echo "== compute-sanitizer"
  for tool in "memcheck prefill decode" "racecheck decode"; do
    read -r name parts <<<"$tool"
    timeout -k 10 "$(( $(left) > 60 ? $(left) - 30 : 30 ))" compute-sanitizer --tool "$name" --error-exitcode 1 \
      python3 scripts/sanitize_kernels.py $parts >"$OUT/sanitize-$name.log" 2>&1
    rc=$?
    tail -n 3 "$OUT/sanitize-$name.log"
    [ "$rc" -ne 0 ] && status=1 && echo "sanitizer $name: FAILED (rc $rc)"
  done
fi

for probe in ${PROBES:-}; do
  case $probe in
    verify) cmd=(python3 -m tileattn verify) ;;
    eager) cmd=(python3 benchmarks/probes/eager_latency.py "$OUT/eager.json") ;;
    hf) cmd=(python3 benchmarks/hf_generate.py "$OUT/hf.json" --new 16 --layers 8 --compile-cases 3) ;;
    *) echo "unknown probe $probe"; continue ;;
  esac
  echo "== probe $probe: ${cmd[*]}"
  timeout -k 10 120 "${cmd[@]}" >"$OUT/$probe.log" 2>&1
  rc=$?
  tail -n 12 "$OUT/$probe.log"
  [ "$rc" -ne 0 ] && echo "probe $probe: rc $rc" && [ "$probe" = verify ] && status=1
done

bench_args=()
[ -n "${PROVIDERS:-}" ] && bench_args+=(--providers "$PROVIDERS")
[ -n "${MODES:-}" ] && bench_args+=(--modes "$MODES")
[ -n "${FILTER:-}" ] && bench_args+=(--filter "$FILTER")
sets=($SETS)
results=()
for i in "${!sets[@]}"; do
  s=${sets[$i]}
  share=$(($(left) - 10 - 90 * (${#sets[@]} - i - 1)))  # keep 90 s for each later set
  if [ "$share" -lt 30 ]; then
    echo "== bench $s: skipped, no time left"
    continue
  fi
  budget=$((share > 90 ? share - 45 : share / 2))  # the last measurement may overrun its start
  echo "== bench $s (budget ${budget}s, hard limit ${share}s)"
  timeout -k 10 "$share" python3 -m benchmarks.run --set "$s" --out "$OUT/$s.json" \
    --budget "$budget" ${bench_args[@]+"${bench_args[@]}"} >"$OUT/$s.log" 2>&1
  rc=$?
  tail -n 2 "$OUT/$s.log"
  [ "$rc" -ne 0 ] && echo "bench $s: rc $rc (see $OUT/$s.log)"
  [ -f "$OUT/$s.json" ] && results+=("$OUT/$s.json")
done

if [ "${#results[@]}" -gt 0 ]; then
  echo "== report"
  python3 -m benchmarks.report "${results[@]}" 2>&1 | tee "$OUT/report.md"
fi
echo "== done in $((SECONDS - start))s, status $status"
exit $status
