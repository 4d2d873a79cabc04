"""Learning-rate schedules and the optax optimizer, from the config.

Schedules are functions of the optimizer step s = 0, 1, ... (the number of
updates already applied), so `schedule(s)` is the rate of update s + 1:

  constant  lr
  step      lr * step_factor ** floor(s / (step_every_epochs * steps_per_epoch))
            (the seed's StepLR: x0.1 every 10 epochs)
  cosine    lr * (1 + cos(pi * (s - warmup) / (total - warmup))) / 2 after warm-up

With warmup_epochs > 0 every schedule is multiplied by a linear warm-up
min(1, (s + 1) / warmup_steps); the step schedule's boundaries stay at
whole epochs counted from the start of training.

Optimizer: global-norm clipping (grad_clip_norm > 0) then Adam, or AdamW
with decoupled weight decay on kernels only (arrays of rank >= 2: conv and
dense kernels, Linformer projections); biases and normalisation scales are
not decayed.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import optax

SCHEDULES = ('constant', 'step', 'cosine')
OPTIMIZERS = ('adam', 'adamw')


def create_learning_rate_schedule(config: ml_collections.ConfigDict,
                                  steps_per_epoch: int,
                                  total_steps: int) -> optax.Schedule:
  base_lr = float(config.learning_rate)
  warmup_steps = int(round(float(config.warmup_epochs) * steps_per_epoch))
  name = config.schedule
  if name not in SCHEDULES:
    raise ValueError(f'schedule must be one of {SCHEDULES}, got {name!r}')
  step_every = max(1, int(round(config.step_every_epochs * steps_per_epoch)))
  factor = float(config.step_factor)
  decay_steps = max(1, total_steps - warmup_steps)

  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    if name == 'constant':
      lr = jnp.full_like(count, base_lr)
    elif name == 'step':
      lr = base_lr * factor ** jnp.floor(count / step_every)
    else:
      progress = jnp.clip((count - warmup_steps) / decay_steps, 0.0, 1.0)
      lr = 0.5 * base_lr * (1.0 + jnp.cos(math.pi * progress))
    if warmup_steps > 0:
      lr = lr * jnp.minimum(1.0, (count + 1.0) / warmup_steps)
    return lr

  return schedule


def _decay_mask(params):
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def create_optimizer(config: ml_collections.ConfigDict,
                     schedule: optax.Schedule) -> optax.GradientTransformation:
  if config.optimizer not in OPTIMIZERS:
    raise ValueError(f'optimizer must be one of {OPTIMIZERS}, got {config.optimizer!r}')
  if config.optimizer == 'adam' and config.weight_decay:
    raise ValueError(
        f'weight_decay={config.weight_decay} needs optimizer=adamw (decoupled '
        'weight decay); Adam here has none')
  parts = []
  if config.grad_clip_norm and config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if config.optimizer == 'adam':
    parts.append(optax.adam(schedule))
  else:
    parts.append(optax.adamw(schedule, weight_decay=config.weight_decay,
                             mask=_decay_mask))
  return optax.chain(*parts)
