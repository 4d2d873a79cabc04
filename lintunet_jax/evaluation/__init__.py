"""Evaluation: what eval.py and predict.py do with a trained workdir.

  report.py      restore, evaluate a whole split, time, draw, write the report
  case_metrics.py  per-case Dice, IoU, NSD, HD95 in nnU-Net's summary layout
  throughput.py  timings that wait for the device (inference, train step)
  visualize.py   overlays and training-curve pictures
  prediction.py  masks for new image files, original sizes restored

Builds on training (its eval step, checkpoints and logs), the models, the
data and `lintunet_jax.metrics`; nothing below imports it
(tests/test_dependencies.py).
"""
