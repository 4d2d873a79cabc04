"""The NNX model as (graph definition, plain pytrees), and the train state.

Jitted steps take and return plain pytrees, not NNX modules: the model is
split once with `split_model` into a `ModelDef` (static: graph definition,
plus the non-trained state such as dropout RNG streams) and `variables`:

  variables = {'params': {...}, 'batch_stats': {...}}   # nested dicts of arrays

(`nnx.to_pure_dict` form: the checkpoint layout, with the same keys
as the module attributes, e.g. variables['params']['enc1']['double_conv']
['conv1']['kernel']). Inside a step, `model_def.merge(params, batch_stats)`
rebuilds a module to call.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax import struct

from lintunet_jax import models

PyTree = Any


def _is_key(x) -> bool:
  return hasattr(x, 'dtype') and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


@dataclasses.dataclass(frozen=True, eq=False)
class ModelDef:
  """Everything about a model except its trained variables."""

  graphdef: Any
  rest: Any  # pure dict of everything not Param/BatchStat (e.g. dropout RNGs)

  @property
  def has_dropout_rngs(self) -> bool:
    return any(_is_key(x) for x in jax.tree.leaves(self.rest))

  def merge(self, params: PyTree, batch_stats: PyTree,
            dropout_key: jax.Array | None = None) -> nnx.Module:
    """A module with these variables (the arrays are used, not copied).

    dropout_key: a typed key from which every dropout RNG stream gets its
    own key (folded with a hash of the stream's path), counts from 0; None
    keeps the initial streams (fine for eval mode, where nothing is drawn).
    """
    rest = self.rest
    if dropout_key is not None:

      def reseed(path, x):
        if _is_key(x):
          name = jax.tree_util.keystr(path)
          return jax.random.fold_in(dropout_key, zlib.crc32(name.encode()) & 0x7FFFFFFF)
        if path and getattr(path[-1], 'key', None) == 'count':
          return jnp.zeros_like(x)
        return x

      rest = jax.tree_util.tree_map_with_path(reseed, rest)
    return nnx.merge(self.graphdef, params, batch_stats, rest)


def _concrete_rest(rest: PyTree) -> PyTree:
  """Abstract (eval_shape) RNG streams -> concrete ones, without compiling.

  Keys get raw data (0, crc32 of the stream's path), counts 0; the values
  only matter for dropout, which training reseeds every step anyway.
  """

  def fill(path, x):
    if not isinstance(x, jax.ShapeDtypeStruct):
      return x
    if _is_key(x):
      data = np.zeros(tuple(x.shape) + (2,), np.uint32)
      data[..., 1] = zlib.crc32(jax.tree_util.keystr(path).encode())
      return jax.random.wrap_key_data(data)
    if path and getattr(path[-1], 'key', None) == 'count':
      return jnp.zeros(x.shape, x.dtype)
    raise ValueError(f'cannot make a value for model state {jax.tree_util.keystr(path)} '
                     f'{x}: only RNG streams are expected outside params/batch_stats')

  return jax.tree_util.tree_map_with_path(fill, rest)


def split_model(model: nnx.Module) -> tuple[ModelDef, dict[str, PyTree]]:
  """model -> (ModelDef, {'params': pure dict, 'batch_stats': pure dict}).

  Works on abstract models (`abstract_model`) too: `variables` then hold
  ShapeDtypeStructs (targets for a restore) and the ModelDef is usable.
  """
  graphdef, params, batch_stats, rest = nnx.split(model, nnx.Param,
                                                  nnx.BatchStat, ...)
  variables = {'params': nnx.to_pure_dict(params),
               'batch_stats': nnx.to_pure_dict(batch_stats)}
  return ModelDef(graphdef, _concrete_rest(nnx.to_pure_dict(rest))), variables


def init_model(model_config, *, seed: int = 0,
               bn_axis_name: str | None = None) -> nnx.Module:
  """`models.create_model`, initialised by one jitted program.

  Eager initialisation compiles one XLA program per parameter shape (RNG
  code is slow to compile on CPU: ~40 s for LinTUNet); this compiles one
  program, at XLA backend optimisation level 0 as it runs once. Same values
  as `create_model` up to float rounding (~1e-7); deterministic, so every
  process of a multi-host run gets the same parameters.
  """
  def create():
    return models.create_model(model_config, seed=seed, bn_axis_name=bn_axis_name)

  graphdef, _ = nnx.split(nnx.eval_shape(create))
  lowered = jax.jit(lambda: nnx.state(create())).lower()
  try:
    compiled = lowered.compile(
        compiler_options={'xla_backend_optimization_level': 0})
  except Exception:  # pylint: disable=broad-except  # option unknown to a backend
    compiled = lowered.compile()
  return nnx.merge(graphdef, compiled())


def abstract_model(model_config, *, bn_axis_name: str | None = None) -> nnx.Module:
  """The model's structure with ShapeDtypeStructs for arrays (no compute)."""
  return nnx.eval_shape(lambda: models.create_model(
      model_config, seed=0, bn_axis_name=bn_axis_name))


def model_variables(model: nnx.Module) -> dict[str, PyTree]:
  """{'params': ..., 'batch_stats': ...} of a module (pure dicts)."""
  return split_model(model)[1]


@struct.dataclass
class TrainState:
  """All that changes during training; a pytree (replicated over devices).

  params/batch_stats: pure dicts (see module docstring); opt_state: optax
  state over params; step: int32 scalar, updates done; rng: uint32 [2] raw
  key data of the run's base RNG (dropout keys are derived from it, the
  step and the device index, so they need no state of their own).
  """

  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  step: jax.Array
  rng: jax.Array

  @property
  def variables(self) -> dict[str, PyTree]:
    return {'params': self.params, 'batch_stats': self.batch_stats}


def new_rng(seed: int) -> np.ndarray:
  return np.asarray(jax.random.key_data(jax.random.key(seed)), np.uint32)


def create_train_state(variables: dict[str, PyTree], optimizer, *, seed: int,
                       step: int = 0) -> TrainState:
  """A host-side train state with a fresh optimizer state."""
  params = variables['params']
  return TrainState(params=params, batch_stats=variables['batch_stats'],
                    opt_state=optimizer.init(params),
                    step=jnp.asarray(step, jnp.int32), rng=new_rng(seed + 2))
