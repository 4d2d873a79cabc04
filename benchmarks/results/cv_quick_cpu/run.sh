#!/bin/bash
# The README's 5-fold + ensemble + sliding-window example at CPU scale: the
# quick recipe on 64x64 patches of the 128x128 synthetic MRI slices, 150
# steps per fold (a check that the whole path runs, not a tuned result).
# Run from the repository root; wrote the two reports in this folder
# (2-core VM, 2026-11-27, shared with other jobs: ~15 min in all).
set -euo pipefail
W=workdirs/cv_quick
for k in 0 1 2 3 4; do
  python train.py --config configs/lintunet.py:quick --workdir $W/fold$k \
      --config.dataset.patch_size=64 --config.dataset.fold=$k --config.num_train_steps=150 \
      --config.progress_bar=False
done
python eval.py $(for k in 0 1 2 3 4; do echo --workdir $W/fold$k; done) --tta flips --nothroughput
python eval.py --workdir $W/fold0 --nothroughput
