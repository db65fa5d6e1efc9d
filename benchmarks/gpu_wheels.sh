#!/usr/bin/env bash
# The wheel folder a lent GPU machine needs to run glance_lightning (benchmarks/gpu_acceptance.py, pytest -m cuda).
#
#   bash benchmarks/gpu_wheels.sh [FOLDER]        (default .whl; run where the package registries are reached)
#
# That machine (Python 3.12, torch 2.11, lightning 2.6.6, transformers 5.17, peft 0.21.0, huggingface_hub 1.33,
# accelerate, safetensors, torchmetrics, pytest; no registry, no hub) lacks diffusers, jsonargparse with its
# `signatures` extra, omegaconf, torchao and this project; diffusers also needs importlib-metadata. Exactly those
# are fetched, at the versions constraints.txt pins, as Python 3.12 manylinux wheels, plus a wheel of this checkout.
# bitsandbytes (over 60 MiB) and wandb stay out: the NF4 / 8-bit rows are then reported as skipped.
# Prints the one line that installs the folder there, offline, and refuses a folder of 40 MiB or more (the tree
# travels with at most 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.whl}
python=${PYTHON:-python3}
LIMIT_MIB=40
PACKAGES=(diffusers importlib-metadata jsonargparse docstring-parser typeshed-client omegaconf torchao)

pins=()
for name in "${PACKAGES[@]}"; do
  pin=$(grep -i -E "^${name}==" constraints.txt || true)
  if [[ -z $pin ]]; then
    echo "gpu_wheels.sh: constraints.txt pins no version of $name" >&2
    exit 2
  fi
  pins+=("$pin")
done

rm -rf "$out"
mkdir -p "$out"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$out" "${pins[@]}"
# The project's wheel from a copy of the checkout's files (tracked and not ignored), so that nothing stale in an
# ignored build/ folder gets into it.
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  [[ -e $f ]] && mkdir -p "$src/$(dirname "$f")" && cp -p "$f" "$src/$f"
done
"$python" -m pip wheel --quiet --no-deps -w "$out" "$src"

count=$(find "$out" -type f -name '*.whl' | wc -l)
if (( count != ${#PACKAGES[@]} + 1 )); then
  echo "gpu_wheels.sh: expected $(( ${#PACKAGES[@]} + 1 )) wheels in $out, found $count" >&2
  exit 1
fi
kib=$(du -sk "$out" | cut -f1)
if (( kib >= LIMIT_MIB * 1024 )); then
  echo "gpu_wheels.sh: $out holds $(( kib / 1024 )) MiB, over the ${LIMIT_MIB} MiB it may take" >&2
  exit 1
fi
echo "$out: $count wheels, $(( (kib + 1023) / 1024 )) MiB:" >&2
ls "$out" >&2
echo "install there (first in the device command; name $out in carry):" >&2
echo "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $out/*.whl && export PYTHONPATH=/tmp/site"
