#!/usr/bin/env bash
# compute-sanitizer's memcheck, racecheck and synccheck over benchmarks/sanitize_cases.py.
#
#   bash benchmarks/sanitize.sh [LOG_DIR]      # from the repository root, on a GPU machine
#
# Prints one line per tool (the sanitizer's "ERROR SUMMARY: N errors" line, the cases' own
# summary, exit status and time) and exits 1 if any tool reports an error or any case fails.
# Full logs go to LOG_DIR (default $OUT/sanitize, or /tmp/sanitize). Environment: PYTHON picks
# the interpreter (default python3); NVIDIA variables are left as they are.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
logs=${1:-${OUT:-/tmp}/sanitize}
mkdir -p "$logs"
status=0
for tool in memcheck racecheck synccheck; do
  log="$logs/$tool.log"
  start=$(date +%s)
  if [ "$tool" = memcheck ]; then
    # Every tensor its own cudaMalloc: the caching allocator's large segments would hide reads
    # past the end of a tensor from memcheck.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
      "$py" benchmarks/sanitize_cases.py >"$log" 2>&1
  else
    compute-sanitizer --tool "$tool" --error-exitcode 1 "$py" benchmarks/sanitize_cases.py >"$log" 2>&1
  fi
  rc=$?
  # memcheck and synccheck end with "ERROR SUMMARY: N errors", racecheck with
  # "RACECHECK SUMMARY: H hazards displayed (N errors, W warnings)".
  summary=$(grep -a "ERROR SUMMARY\|RACECHECK SUMMARY" "$log" | tail -n 1 | sed 's/^=* *//')
  cases=$(grep -a "^sanitize cases:" "$log" | tail -n 1)
  echo "$tool: ${summary:-no ERROR SUMMARY line} | ${cases:-cases did not finish} | exit $rc, $(($(date +%s) - start)) s"
  errors=$(printf '%s\n' "$summary" | sed -n 's/.*ERROR SUMMARY: \([0-9][0-9]*\) error.*/\1/p; s/.*(\([0-9][0-9]*\) errors,.*/\1/p')
  if [ "$rc" -ne 0 ] || [ "${errors:-x}" != 0 ]; then
    status=1
    echo "  see $log"
  fi
done
exit $status
