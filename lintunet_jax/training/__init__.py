"""Training: the loop and everything it needs.

  loop.py           train_and_evaluate: data-parallel steps, validation, resume
  state.py          the train state (model split into graph and variables)
  optim.py          optimizer and learning-rate schedule from the config
  losses.py         segmentation losses on logits, one value per example
  parallel.py       the device mesh, sharding, the platform check
  distributed.py    multi-process start-up, shared-storage checks, barriers
  checkpointing.py  the workdir and checkpoint layout (orbax)
  metric_logs.py    metrics.jsonl, TensorBoard and the progress bar

Builds on the models, the data and `lintunet_jax.metrics`; imports nothing
of evaluation (tests/test_dependencies.py).
"""
