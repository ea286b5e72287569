#!/usr/bin/env bash
# Build some Cython modules in place, serialised with other builds of this tree.
#   scripts/build-one.sh bdev [iomap dio ...]
set -euo pipefail
cd "$(dirname "$0")/.."
only=$(IFS=,; echo "$*")
exec flock .build.lock env UFS_BUILD_ONLY="$only" .venv/bin/python setup.py -q build_ext --inplace
