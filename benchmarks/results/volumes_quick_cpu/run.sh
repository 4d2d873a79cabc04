#!/usr/bin/env bash
# volumes_quick end to end on the CPU: train on the synthetic nnU-Net raw
# dataset (fold 0 of 5 by case), predict its imagesTs as NIfTI volumes,
# evaluate the test split per volume in 3-D, then score the written NIfTI
# files with nnU-Net v2's own evaluation (requirements-torch.txt) and compare.
# Run from the repository root; copies the result files here.
set -euo pipefail
run=${RUN:-/tmp/volumes_quick_run}
data=${DATA:-/tmp/volumes_quick_tfds}
here=benchmarks/results/volumes_quick_cpu
rm -rf "$run"
/usr/bin/time -f 'train: %e s' python train.py --config configs/lintunet.py:volumes_quick \
    --workdir "$run" --config.dataset.data_dir="$data" --config.progress_bar=False 2>&1 | tail -n 3
python predict.py --workdir "$run" --output "$run/predicted" \
    --input "$data/downloads/manual/nnunet_raw/Dataset990_SyntheticCTMR/imagesTs" | tail -n 1
python eval.py --workdir "$run" --nothroughput --noprogress --report "$run/eval/test.json" \
    | tee "$here/eval_table.txt"
cp "$run/eval/test.json" "$here/test.json"
cp "$run/eval/test.cases.json" "$here/test.cases.json"
cp "$run/predicted/predictions.json" "$here/predictions.json"
cp "$run/splits.json" "$run/volume_statistics.json" "$here/"
# nnU-Net v2's own evaluation of predict.py's files against labelsTs,
# beside eval.py's per-volume numbers.
python benchmarks/nnunet_agreement.py \
    --labels "$data/downloads/manual/nnunet_raw/Dataset990_SyntheticCTMR/labelsTs" \
    --predicted "$run/predicted" --cases "$here/test.cases.json" \
    --out "$here/nnunet_summary.json" | tee "$here/nnunet_agreement.txt"
