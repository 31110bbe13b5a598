#!/usr/bin/env bash
# The course's bundled cohorts, one per experiment of the paper, synthesised offline and prepared for training:
# normal T1w (the ADNI experiment), tumour FLAIR and T2w (BraTS), stroke T1w (ATLAS).
#   bash data_scripts/synth_cohorts.sh [OUT=data] [N=500] [SIZE=64]
set -euo pipefail
out=${1:-data}
n=${2:-500}
size=${3:-64}
raw=$(( size * 2 > 128 ? 128 : size * 2 ))
for spec in normal:t1 tumor:flair tumor:t2 stroke:t1; do
    kind=${spec%%:*}
    contrast=${spec##*:}
    python -m alphagan synth --out "$out/synth-$kind-$contrast" --n "$n" --size "$raw" --kind "$kind" --contrast "$contrast"
    python -m alphagan prepare --src "$out/synth-$kind-$contrast" --layout flat --out "$out/cache-$kind-$contrast-$size" --size "$size"
done
