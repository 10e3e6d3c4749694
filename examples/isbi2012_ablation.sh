#!/usr/bin/env bash
# The pix2pix loss ablation (Isola et al. 2017, Table 1) plus the U-Net baseline on ISBI 2012,
# in both directions. Walk-through, expected times and how to read the report:
# examples/isbi2012_ablation.md.
#
#   examples/isbi2012_ablation.sh                 # 1000 steps per run, 12 runs
#   STEPS=20 VARIANTS=unet,l1_cgan examples/isbi2012_ablation.sh   # a smoke test, minutes
#
# Re-running it continues an interrupted ablation: finished runs are skipped, a partial one
# resumes from its last checkpoint.
set -euo pipefail

CELLP2P=${CELLP2P:-cellp2p}               # e.g. CELLP2P=.venv/bin/cellp2p
OUT=${OUT:-isbi2012_ablation}             # results: $OUT/em_to_membranes, $OUT/membranes_to_em
STEPS=${STEPS:-1000}
COMMON=(--manifest isbi2012 --max-steps "$STEPS" --batch-size 4 --crop 256 --preset small
        --seed 0 --quiet)
if [[ -n ${DATA_DIR:-} ]]; then COMMON+=(--data-dir "$DATA_DIR"); fi
if [[ -n ${VARIANTS:-} ]]; then COMMON+=(--variants "$VARIANTS"); fi

# 1. EM -> membranes (segmentation). Its U-Net is the segmenter of step 2.
"$CELLP2P" ablate "${COMMON[@]}" --task segment --out "$OUT/em_to_membranes"

# 2. membranes -> EM (translation, labels to images), scored as images (MAE/PSNR/SSIM) and by
#    how well the step-1 U-Net segments the generated images (segmentability, FCN-score).
"$CELLP2P" ablate "${COMMON[@]}" --task translate --direction BtoA \
    --segmenter "$OUT/em_to_membranes/runs/unet" --out "$OUT/membranes_to_em"

echo "reports: $OUT/em_to_membranes/report.html and $OUT/membranes_to_em/report.html"
