"""Segmentation losses on logits, one value per example.

Every loss returns float32 [B]: each image's own loss. The training loss
is the mean over the global batch, so it does not depend on how a batch is
split over devices, and evaluation can sum valid examples exactly.

  bce       binary cross-entropy on logits (num_classes=1), as the seed's
            BCEWithLogitsLoss; softmax cross-entropy for num_classes>1.
  dice      1 - soft Dice of each image (foreground probability for binary
            models; the mean over foreground classes 1..C-1 otherwise),
            smoothed by DICE_SMOOTH so empty masks give 0 loss when the
            prediction is empty too.
  bce_dice  bce + dice.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

LOSSES = ('bce', 'dice', 'bce_dice')
DICE_SMOOTH = 1.0


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """[B,H,W,C] logits, int [B,H,W] labels -> [B] mean pixel cross-entropy."""
  logits = logits.astype(jnp.float32)
  if logits.shape[-1] == 1:
    per_pixel = optax.sigmoid_binary_cross_entropy(
        logits[..., 0], labels.astype(jnp.float32))
  else:
    per_pixel = optax.softmax_cross_entropy_with_integer_labels(
        logits, labels.astype(jnp.int32))
  return jnp.mean(per_pixel, axis=(1, 2))


def soft_dice_loss(logits: jax.Array, labels: jax.Array,
                   smooth: float = DICE_SMOOTH) -> jax.Array:
  """[B,H,W,C] logits, int [B,H,W] labels -> [B] 1 - soft Dice per image."""
  logits = logits.astype(jnp.float32)
  if logits.shape[-1] == 1:
    probs = jax.nn.sigmoid(logits)  # [B,H,W,1]: the foreground
    onehot = (labels[..., None] > 0).astype(jnp.float32)
  else:
    num_classes = logits.shape[-1]
    probs = jax.nn.softmax(logits, axis=-1)[..., 1:]
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)[..., 1:]
  inter = jnp.sum(probs * onehot, axis=(1, 2))  # [B,K]
  total = jnp.sum(probs, axis=(1, 2)) + jnp.sum(onehot, axis=(1, 2))
  dice = (2.0 * inter + smooth) / (total + smooth)
  return 1.0 - jnp.mean(dice, axis=-1)


def per_example_loss(name: str, logits: jax.Array, labels: jax.Array) -> jax.Array:
  """The configured loss (`config.loss`), float32 [B]."""
  if name == 'bce':
    return cross_entropy(logits, labels)
  if name == 'dice':
    return soft_dice_loss(logits, labels)
  if name == 'bce_dice':
    return cross_entropy(logits, labels) + soft_dice_loss(logits, labels)
  raise ValueError(f'loss must be one of {LOSSES}, got {name!r}')
