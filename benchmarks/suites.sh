#!/usr/bin/env bash
# The serving suite (graph mode, append pattern) and the eager suite on one GPU, each method's
# time its median of 5 rounds in which the methods take turns; results under $OUT:
#
#   bash benchmarks/suites.sh [serving|eager|mla|all]     # default all
#
# writes $OUT/serving and $OUT/eager (results.json, results.md; eager also results.png); mla
# (benchmarks/mla.py's default rows plus rope-apart ones, against FlashInfer and the split-KV
# Triton peer) prints its table and writes $OUT/mla.md. The eager run leaves out flex (compiled FlexAttention: a compile per shape, never the best peer here).
# Compare each against the committed baseline:
#   python3 benchmarks/compare.py benchmarks/results/h200-baseline/serving/results.json $OUT/serving/results.json
#   python3 benchmarks/compare.py benchmarks/results/h200-baseline/eager/results.json $OUT/eager/results.json
# Exit status: 1 when a method's output missed the appended token (or a run failed), else 0.
set -u -o pipefail
cd "$(dirname "$0")/.."
. benchmarks/device_setup.sh
what="${1:-all}"
status=0
if [ "$what" = all ] || [ "$what" = serving ]; then
  python3 -m leanattn bench --mode graph --suite serving --pattern append --out "$OUT/serving" || status=1
fi
if [ "$what" = all ] || [ "$what" = eager ]; then
  python3 -m leanattn bench --mode eager --suite eager --out "$OUT/eager" \
    --methods leanattn leanattn_graph sdpa_flash sdpa_cudnn flashinfer flashinfer_tc fa2_varlen || status=1
fi
if [ "$what" = all ] || [ "$what" = mla ]; then
  python3 benchmarks/mla.py --shapes 1x32k@16 1x128k@16 4x8k@128 16x4k@16 128x1152@128 64x4k@128 32x16k@64 \
    8x8k~@16 32x4k~@128 4x32k@16:fp8 16x4k@16:page=1 1x32k@16:apart 64x4k@128:apart | tee "$OUT/mla.md" || status=1
fi
exit $status
