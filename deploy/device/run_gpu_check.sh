#!/usr/bin/env bash
# On the GPU machine (and in the CPU rehearsal): install the carried wheels beside the image's own packages, run
# nst-gpu-check from the source tree, and leave in $OUT gpu_check.log (its output), summary.json,
# gpu_check.tar.gz (every file it wrote but the large jobs' full-size pictures) and those pictures (at most 3).
#   OUT=... bash deploy/device/run_gpu_check.sh [nst-gpu-check options, e.g. --smoke]
# Environment: OUT (required), PYTHON (python3), WHEELS (.whl), SITE (/tmp/site), BUDGET_S (400: nst-gpu-check's
# --budget-s; the whole script is killed 60 s after it).
set -uo pipefail
cd "$(dirname "$0")/../.."
: "${OUT:?OUT must name the folder for the results}"
python="${PYTHON:-python3}"
wheels="${WHEELS:-.whl}"
site="${SITE:-/tmp/site}"
budget="${BUDGET_S:-400}"
"$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$wheels"/*.whl || { echo "run_gpu_check.sh: the carried wheels in $wheels did not install" >&2; exit 3; }
src="$PWD/proto:$PWD/client:$PWD/server:$PWD/export:$PWD/bench:$PWD/tools"   # every package folder
export PYTHONPATH="$site:$src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
work="$(mktemp -d)"
# timeout signals its whole process group; nst-gpu-check kills the process groups of the steps it started.
timeout -k 10 "$((budget + 60))" "$python" -m nst_tools.gpu_check "$work/gpu_check" --budget-s "$budget" \
    --archive "$OUT/gpu_check.tar.gz" "$@" > "$OUT/gpu_check.log" 2>&1
code=$?
cp "$work/gpu_check/summary.json" "$OUT/summary.json" 2>/dev/null
# The large jobs' full-size pictures travel as files of their own (not in the archive: 16 MiB a file at most).
for picture in "$work"/gpu_check/large_[0-9]*.png "$work"/gpu_check/large_[0-9]*.jpg; do
    [ -f "$picture" ] || continue                   # the pattern itself, where nothing matched
    case "$picture" in *_1024.jpg) ;; *) cp "$picture" "$OUT/" ;; esac
done
tail -n 30 "$OUT/gpu_check.log"
echo "run_gpu_check.sh: nst-gpu-check exited $code; results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit "$code"
