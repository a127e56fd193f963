#!/usr/bin/env bash
# Download, into .whl/ (ignored by git), the wheels that tools/gpu_check.sh installs on the GPU machine, which has python 3.12,
# torch, torchvision and the scientific stack but no fastai and no network; and build this project's own wheel there too.
# Run it here, with network, before a GPU run; the folder then travels with the run (`carry: [".whl"]`).
#   bash tools/gpu_wheels.sh [PYTHON]        # PYTHON: an interpreter with pip (default python3)
# The versions are the ones this project is tested with. Only what the GPU machine's image lacks is downloaded: it has torch,
# torchvision, numpy, pandas, matplotlib, scikit-learn, scipy, requests, pyyaml, pillow, cloudpickle, packaging, rich,
# einops, tqdm, anyio, python-dateutil, typing-extensions, pytest, pytest-xdist and hypothesis (see its package list).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
WHL=.whl
NEED=(fastai==2.8.12 fastcore==2.2.41 fasttransform==0.0.5 fastprogress==1.1.6 fastdownload==0.0.8
      plum-dispatch==2.9.0 beartype==0.23.1                                            # fastai's dispatch (fasttransform)
      python-fasthtml==0.14.14 starlette==1.10.0 itsdangerous==2.2.0 python-multipart==0.0.34 sniffio==1.3.1  # what fastprogress imports
      torch-pruning==1.6.1)                                                             # shrink (fastsparse.export)
OPTIONAL=(fasterai==0.4.1)                                                              # the benchmark's comparison; it runs without
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform any)
rm -rf "$WHL"; mkdir -p "$WHL"
"$PY" -m pip download -q --no-deps "${PLAT[@]}" -d "$WHL" "${NEED[@]}"
"$PY" -m pip download -q --no-deps "${PLAT[@]}" -d "$WHL" "${OPTIONAL[@]}" || echo "gpu_wheels: no wheel for ${OPTIONAL[*]} (optional)"
had_build=$([ -e build ] && echo yes || true)
"$PY" -m pip wheel -q --no-deps -w "$WHL" .   # this project, for its metadata: gpu_check.sh runs the code of the checkout itself
[ -n "$had_build" ] || rm -rf build           # (setuptools' scratch folder)
ls -l "$WHL"
kib=$(du -sk "$WHL" | cut -f1)
echo "gpu_wheels: $(ls "$WHL"/*.whl | wc -l) wheels, $((kib / 1024)) MiB in $WHL/"
if [ "$kib" -gt $((40 * 1024)) ]; then echo "gpu_wheels: over 40 MiB: the working tree that travels is limited to 64 MiB" >&2; exit 1; fi
