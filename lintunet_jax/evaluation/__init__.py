"""Evaluation: what eval.py and predict.py do with a trained workdir.

  settings.py          EvalSettings / InferenceChoice / PredictOptions: the
                       choices of eval.py, predict.py and the export, built once
  report.py            restore, evaluate a whole split, time, draw, write the report
  sliding_window.py    whole images at their own size: tiles, Gaussian blending,
                       flips TTA, ensembles, split over devices (one jit function)
  whole_image_eval.py  eval.py's entry (`run`); its path through the sliding
                       window / TTA / ensembles
  stream.py            the one loop running a predictor over images at their
                       own size (whole_image_eval, predict.py, the seed table)
  ensemble.py          the one restore: workdirs restored and checked to agree
  inference_flags.py   the --sliding_window/--overlap/--tta flags of every tool
  case_metrics.py      per-case Dice, IoU, NSD, HD95 in nnU-Net's summary layout
  throughput.py        timings that wait for the device (inference, train step)
  visualize.py         overlays and training-curve pictures
  prediction.py        masks for new image files, original sizes restored

Builds on training (its eval step, checkpoints and logs), the models, the
data and `lintunet_jax.metrics`; nothing below imports it
(tests/test_dependencies.py).
"""
