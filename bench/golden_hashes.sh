#!/usr/bin/env bash
# The golden bits of a refvit tree, to show that a change moves none: quantizes the embedded model with every
# named scheme on the 4 bundled example images, dumps seed 3 (batch 2) with internals in all four formats in
# both roundings, one pruned graph and the shipped model on the examples, and writes the sha256 of every file.
# usage: bench/golden_hashes.sh REPO OUTDIR   -> OUTDIR/hashes.txt; compare two trees with diff (the .h files also
# carry identifiers and #defines, so compare .npy/.hex/.bin for the bits)
set -euo pipefail
REPO=$1; OUT=$2; mkdir -p "$OUT"; cd "$REPO"
export PYTHONPATH=$REPO
CAL=$(ls refvit/data/examples/*.png | head -4)
for s in $(python -c "from refvit.graph import SCHEMES; print(' '.join(SCHEMES))"); do
  python -m refvit quantize --calib $CAL --scheme $s --out "$OUT/$s.safetensors" --quiet >/dev/null 2>&1 || python -m refvit quantize --calib $CAL --scheme $s --out "$OUT/$s.safetensors" >/dev/null
  for r in SINGLE_ROUND DOUBLE_ROUND; do
    python -m refvit golden --model "$OUT/$s.safetensors" --rounding $r --seed 3 --batch 2 --internals --formats npy,hex,bin,h --out "$OUT/g-$s-$r" --quiet >/dev/null
  done
done
python -m refvit golden --model "$OUT/refvit-int8.safetensors" --prune 1:0.7,3:0.5 --seed 3 --batch 2 --internals --formats npy,hex,bin,h --out "$OUT/g-pruned" --quiet >/dev/null
python -m refvit golden --model refvit/data/fmnist_deit_int8.safetensors --image refvit/data/examples --formats npy,hex --out "$OUT/g-shipped" --quiet >/dev/null
cd "$OUT"; find g-* -type f ! -name manifest.json | sort | xargs sha256sum > hashes.txt
wc -l hashes.txt
