#!/usr/bin/env bash
# Here, before a GPU run: download the wheels of deploy/device/wheels.txt for the device image's Python into a
# folder that git ignores, to be named in the device tool's `carry`.
#   bash deploy/device/prepare.sh [PYTHON_VERSION (default 3.12)] [FOLDER (default .whl)]
# Prints each wheel's size and the total; fails when the total passes 56 MiB (the device tool carries at most
# 64 MiB with the working tree, about 1.5 MiB).
set -euo pipefail
cd "$(dirname "$0")/../.."
version="${1:-3.12}"
folder="${2:-.whl}"
python="${PIP_PYTHON:-python3}"
mkdir -p "$folder"
rm -f "$folder"/*.whl
grep -v -E '^\s*(#|$)' deploy/device/wheels.txt | while read -r requirement; do
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$folder" "$requirement" 2>&1 \
        | grep -v "is ignored: it is neither a file nor a directory" || true
done
count=$(ls "$folder"/*.whl | wc -l)
expected=$(grep -c -v -E '^\s*(#|$)' deploy/device/wheels.txt)
du -b "$folder"/*.whl | awk '{printf "%8.2f MiB  %s\n", $1 / 1048576, $2; total += $1}
    END {printf "%8.2f MiB  total\n", total / 1048576; if (total > 56 * 1048576) exit 1}'
if [ "$count" -ne "$expected" ]; then
    echo "prepare.sh: $count wheels in $folder, expected $expected (one per line of deploy/device/wheels.txt)" >&2
    exit 1
fi
