#!/usr/bin/env bash
# The test suite on a GPU machine in parts, each within one 10-minute device command from a cold
# Triton cache (the whole suite compiles too many kernels for one): part K of N runs the test
# files that a greedy split of their test counts (at most 100 a file: the largest files are
# pure-Python schedule tests) deals to it, on 15 pytest workers.
#
#   bash benchmarks/gpu_tests.sh K N [pytest args...]      # e.g. 1 3, then 2 3, then 3 3
#
# Writes $OUT/gpu-tests-K.txt (pytest's report) and $OUT/gpu-tests-K.xml (JUnit) and prints
# the summary and the failures. Exit status: pytest's.
set -u -o pipefail
cd "$(dirname "$0")/.."
. benchmarks/device_setup.sh
part="${1:?part K}"; parts="${2:?parts N}"; shift 2
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/tcache}"
files=$(python3 - "$part" "$parts" <<'PY'
import collections, subprocess, sys
part, parts = int(sys.argv[1]), int(sys.argv[2])
lines = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
                       capture_output=True, text=True).stdout.splitlines()
count = collections.Counter(line.split("::")[0] for line in lines if "::" in line)
load = [0] * parts
mine = []
for name, n in sorted(count.items(), key=lambda kv: (-kv[1], kv[0])):
    k = load.index(min(load))
    load[k] += min(n, 100)
    if k == part - 1:
        mine.append(name)
print(" ".join(mine))
PY
)
echo "part $part of $parts: $files"
python3 -m pytest -q -n 15 --dist load -p no:cacheprovider -rfE --junitxml="$OUT/gpu-tests-$part.xml" "$@" $files \
  > "$OUT/gpu-tests-$part.txt" 2>&1
status=$?
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gpu-tests-$part.txt" | tail -25
exit $status
