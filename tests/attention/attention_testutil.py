"""Shared helpers of the attention-kernel tests: fresh random inputs (a new
draw every run, never zeros), the dense boolean mask of a pattern, and the
relative error the tolerances are stated in."""

import jax.numpy as jnp
import numpy as np

RNG = np.random.default_rng()


def rel_err(out, ref) -> float:
  """||out - ref|| / ||ref|| in float64."""
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30)


def random_inputs(n, global_len=0, *, count=3, batch=2, heads=2, dim=8):
  """`count` float32 [batch, heads, n, dim] arrays (q, k, v[, cotangent])
  and, when global_len > 0, a (keys, values) pair of global_len summaries."""
  arrays = [jnp.asarray(RNG.standard_normal((batch, heads, n, dim)), jnp.float32)
            for _ in range(count)]
  global_kv = None
  if global_len:
    global_kv = tuple(jnp.asarray(RNG.standard_normal((batch, heads, global_len, dim)),
                                  jnp.float32) for _ in range(2))
  return arrays, global_kv


def dense_mask(mask, n) -> np.ndarray:
  """bool [n, n] (query, key) of a `masks.Mask`."""
  idx = np.arange(n)
  return np.asarray(mask(idx[:, None], idx[None, :]), bool)
