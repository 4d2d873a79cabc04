"""Imports U-Net / LinTUNet checkpoints trained with the seed's PyTorch notebook.

  python -m lintunet_jax.convert_torch --checkpoint model.pth \\
      --model unet|lintunet --workdir DIR [--image-size 224]

reads a `torch.save(model.state_dict(), ...)` file, converts every tensor to
the layout of this project's NNX modules and writes DIR as a workdir the
project could have trained itself: a model-only orbax checkpoint at step 0
plus the matching config (`checkpointing.write_weights_checkpoint`), so that
eval.py, predict.py and fine-tuning with train.py work on it.

The converted config is the seed's: `configs/lintunet.py:seed` (Linformer
attention, dim 8w, seq_len and k read from `proj_k`, depth from the layer
count) or `configs/unet.py`, with width / in_channels / num_classes read from
the weights, `dataset.image_size` = --image-size (224, what the notebook fed
its models, by default) and `dataset.normalization = 'seed'`: the notebook's
preprocessing, grayscale -> x/255 -> (x - 0.5)/0.5 -> clamp to [0, 1].
With 224x224 inputs the Linformer built for 256 tokens sees 196 and uses the
first 196 rows of `proj_k` / `proj_v`, in the `linformer` package and here.

Checkpoints are untrusted: they are read with `torch.load(weights_only=True)`
(tensors and plain containers only, no arbitrary unpickling). A bare state
dict is accepted, or one nested under a common key ('state_dict',
'model_state_dict', 'model', ...), with an optional 'module.' (DataParallel)
or '_orig_mod.' (torch.compile) prefix. Every key is mapped explicitly
(`key_table`), and the complete key set and every shape are validated before
anything is written; on any problem the error lists the offending keys and
DIR is left untouched.

torch is an optional dependency, needed only here:
  pip install torch==2.13.0          (or: pip install -r requirements-torch.txt)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pathlib
import pickle
import sys
import zipfile
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from lintunet_jax import models
from lintunet_jax import paths

TORCH_HINT = ('converting PyTorch checkpoints needs torch (an optional '
              'dependency): pip install torch==2.13.0  '
              '(or pip install -r requirements-torch.txt)')
MODELS = ('unet', 'lintunet')
SEED_IMAGE_SIZE = 224  # the notebook's Resize(224)
SEED_NORMALIZATION = 'seed'  # grayscale, x/255, (x-0.5)/0.5, clamp to [0, 1]
# Containers a state dict is commonly nested in, tried in this order.
NESTING_KEYS = ('state_dict', 'model_state_dict', 'model', 'net', 'network',
                'module', 'ema_state_dict', 'ema')
# Prefixes that wrappers put on every key (DataParallel / DDP, torch.compile).
WRAPPER_PREFIXES = ('module.', '_orig_mod.')
LINFORMER_PREFIX = 'attention.linformer.net.layers.'
_MAX_LISTED = 40


class ConversionError(ValueError):
  """The checkpoint cannot be converted; the message says why and which keys."""


# ---------------------------------------------------------------------------
# The key table: PyTorch key -> NNX path + layout transform.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one PyTorch tensor becomes one NNX variable."""
  name: str
  to_jax: Callable[[np.ndarray], np.ndarray]
  # The PyTorch shape that yields a given NNX shape.
  torch_shape: Callable[[tuple[int, ...]], tuple[int, ...]]


LAYOUTS = {
    # Biases, norm scales/shifts, BN statistics, Linformer projections.
    'copy': Layout('copy', lambda a: a, lambda s: tuple(s)),
    # Conv2d weight OIHW -> nnx.Conv kernel HWIO (both cross-correlations).
    'conv': Layout('conv', lambda a: a.transpose(2, 3, 1, 0),
                   lambda s: (s[3], s[2], s[0], s[1])),
    # ConvTranspose2d weight (in, out, kH, kW) -> nnx.ConvTranspose kernel
    # (kH, kW, in, out), spatially flipped: PyTorch scatters x[i] * W[a] to
    # output 2i + a, while lax.conv_transpose correlates the stride-dilated,
    # (k-1)-padded input with the kernel, which puts K[k-1-a] there.
    'conv_transpose': Layout(
        'conv_transpose', lambda a: a[:, :, ::-1, ::-1].transpose(2, 3, 0, 1),
        lambda s: (s[2], s[3], s[0], s[1])),
    # Linear weight (out, in) -> nnx.Linear kernel (in, out).
    'linear': Layout('linear', lambda a: a.T, lambda s: (s[1], s[0])),
}


@dataclasses.dataclass(frozen=True)
class KeyMapping:
  torch_key: str
  nnx_path: tuple[str | int, ...]
  layout: str


def _double_conv(torch_prefix: str, nnx_prefix: tuple) -> list[KeyMapping]:
  return [
      KeyMapping(f'{torch_prefix}conv1.weight', (*nnx_prefix, 'conv1', 'kernel'), 'conv'),
      KeyMapping(f'{torch_prefix}conv1.bias', (*nnx_prefix, 'conv1', 'bias'), 'copy'),
      KeyMapping(f'{torch_prefix}conv2.weight', (*nnx_prefix, 'conv2', 'kernel'), 'conv'),
      KeyMapping(f'{torch_prefix}conv2.bias', (*nnx_prefix, 'conv2', 'bias'), 'copy'),
      KeyMapping(f'{torch_prefix}norm.weight', (*nnx_prefix, 'norm', 'scale'), 'copy'),
      KeyMapping(f'{torch_prefix}norm.bias', (*nnx_prefix, 'norm', 'bias'), 'copy'),
      KeyMapping(f'{torch_prefix}norm.running_mean', (*nnx_prefix, 'norm', 'mean'), 'copy'),
      KeyMapping(f'{torch_prefix}norm.running_var', (*nnx_prefix, 'norm', 'var'), 'copy'),
  ]


def _linformer_layer(i: int, share_kv: bool) -> list[KeyMapping]:
  """linformer.Linformer's layer i: `.0` = PreNorm(attention), `.1` = PreNorm(FF)."""
  t = f'{LINFORMER_PREFIX}{i}.'
  n = ('attention', 'layers', i)
  table = [
      KeyMapping(f'{t}0.norm.weight', (*n, 'attn_norm', 'scale'), 'copy'),
      KeyMapping(f'{t}0.norm.bias', (*n, 'attn_norm', 'bias'), 'copy'),
      KeyMapping(f'{t}0.fn.to_q.weight', (*n, 'attn', 'to_q', 'kernel'), 'linear'),
      KeyMapping(f'{t}0.fn.to_k.weight', (*n, 'attn', 'to_k', 'kernel'), 'linear'),
      KeyMapping(f'{t}0.fn.proj_k', (*n, 'attn', 'proj_k'), 'copy'),
  ]
  if not share_kv:
    table += [
        KeyMapping(f'{t}0.fn.to_v.weight', (*n, 'attn', 'to_v', 'kernel'), 'linear'),
        KeyMapping(f'{t}0.fn.proj_v', (*n, 'attn', 'proj_v'), 'copy'),
    ]
  table += [
      KeyMapping(f'{t}0.fn.to_out.weight', (*n, 'attn', 'to_out', 'kernel'), 'linear'),
      KeyMapping(f'{t}0.fn.to_out.bias', (*n, 'attn', 'to_out', 'bias'), 'copy'),
      KeyMapping(f'{t}1.norm.weight', (*n, 'ff_norm', 'scale'), 'copy'),
      KeyMapping(f'{t}1.norm.bias', (*n, 'ff_norm', 'bias'), 'copy'),
      KeyMapping(f'{t}1.fn.w1.weight', (*n, 'ff', 'w1', 'kernel'), 'linear'),
      KeyMapping(f'{t}1.fn.w1.bias', (*n, 'ff', 'w1', 'bias'), 'copy'),
      KeyMapping(f'{t}1.fn.w2.weight', (*n, 'ff', 'w2', 'kernel'), 'linear'),
      KeyMapping(f'{t}1.fn.w2.bias', (*n, 'ff', 'w2', 'bias'), 'copy'),
  ]
  return table


_ENCODERS = ('enc1', 'enc2', 'enc3', 'enc4')
_DECODERS = ('dec4', 'dec3', 'dec2', 'dec1')


def key_table(model: str, *, attention_depth: int = 1,
              share_kv: bool = False) -> list[KeyMapping]:
  """Every PyTorch key of the seed's `model` with its NNX path and layout."""
  if model not in MODELS:
    raise ValueError(f'model must be one of {MODELS}, got {model!r}')
  table = []
  for name in _ENCODERS:
    table += _double_conv(f'{name}.double_conv.', (name, 'double_conv'))
  if model == 'lintunet':
    for i in range(attention_depth):
      table += _linformer_layer(i, share_kv)
  table += _double_conv('bottleneck.', ('bottleneck',))
  for name in _DECODERS:
    table += [
        KeyMapping(f'{name}.upconv.weight', (name, 'upconv', 'kernel'), 'conv_transpose'),
        KeyMapping(f'{name}.upconv.bias', (name, 'upconv', 'bias'), 'copy'),
    ]
    table += _double_conv(f'{name}.double_conv.', (name, 'double_conv'))
  table += [
      KeyMapping('final_conv.weight', ('final_conv', 'kernel'), 'conv'),
      KeyMapping('final_conv.bias', ('final_conv', 'bias'), 'copy'),
  ]
  return table


def ignored_keys(model: str) -> set[str]:
  """Keys accepted but not converted: BatchNorm's num_batches_tracked (only
  used by PyTorch when BatchNorm momentum is None, which the seed's is not)."""
  prefixes = [f'{n}.double_conv.' for n in _ENCODERS + _DECODERS] + ['bottleneck.']
  return {f'{p}norm.num_batches_tracked' for p in prefixes}


# ---------------------------------------------------------------------------
# Reading the checkpoint.
# ---------------------------------------------------------------------------


def _import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError(TORCH_HINT) from e
  return torch


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a PyTorch checkpoint safely into {key: numpy array}."""
  torch = _import_torch()
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConversionError(f'{path}: no such checkpoint file')
  with open(path, 'rb') as f:
    head = f.read(2)
  # torch.save writes a zip archive (a legacy one: a pickle, protocol >= 2).
  if not (zipfile.is_zipfile(path) or head[:1] == b'\x80'):
    raise ConversionError(
        f'{path} is not a PyTorch checkpoint (neither the zip archive nor the '
        f'pickle torch.save writes)')
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    detail = _weights_only_detail(e)
    if 'global' in detail.lower():
      raise ConversionError(
          f'{path}: refused to unpickle it: it holds Python objects other than '
          f'tensors and plain containers, and checkpoints are only loaded with '
          f'torch.load(weights_only=True). Re-save just the weights, '
          f'torch.save(model.state_dict(), path). ({detail})') from e
    raise ConversionError(
        f'{path} is not a PyTorch checkpoint torch.load(weights_only=True) '
        f'can read ({detail})') from e
  except Exception as e:  # pylint: disable=broad-except
    raise ConversionError(
        f'{path} is not a PyTorch checkpoint torch.load can read '
        f'({type(e).__name__}: {_first_line(e)})') from e
  state = _unwrap(obj, path)
  bad = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
  if bad:
    raise ConversionError(
        f'{path}: these entries of the state dict are not tensors: '
        f'{_listing(bad)}')
  out = {}
  for key, tensor in state.items():
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point() and tensor.dtype not in (torch.float32, torch.float64):
      tensor = tensor.to(torch.float32)  # float16 / bfloat16
    out[key] = tensor.numpy()
  return out


def _weights_only_detail(e: BaseException) -> str:
  """The specific reason in torch's long weights_only error message."""
  text = str(e)
  marker = 'WeightsUnpickler error:'
  if marker in text:
    rest = text.split(marker, 1)[1].strip()
    if rest:
      return rest.splitlines()[0].split('. Please')[0].strip()
  return _first_line(e)


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def _is_state_dict(obj: Any) -> bool:
  return (isinstance(obj, Mapping) and bool(obj)
          and all(isinstance(k, str) for k in obj)
          and all(hasattr(v, 'shape') for v in obj.values()))


def _unwrap(obj: Any, path: pathlib.Path) -> dict[str, Any]:
  """A bare state dict, or the first one nested under NESTING_KEYS."""
  seen = [obj]
  for _ in range(3):
    if _is_state_dict(obj):
      return _strip_wrapper_prefixes(dict(obj))
    if not isinstance(obj, Mapping):
      break
    inner = next((obj[k] for k in NESTING_KEYS if k in obj), None)
    if inner is None:
      break
    obj = inner
    seen.append(obj)
  top = seen[0]
  if isinstance(top, Mapping):
    keys = sorted(map(str, top))
    raise ConversionError(
        f'{path}: no state dict found. Expected a dict of tensors '
        f'(torch.save(model.state_dict(), path)) or one nested under one of '
        f'{list(NESTING_KEYS)}; the top-level keys are {_listing(keys)}')
  raise ConversionError(
      f'{path}: no state dict found: the checkpoint holds a '
      f'{type(top).__name__}, not a dict of tensors')


def _strip_wrapper_prefixes(state: dict[str, Any]) -> dict[str, Any]:
  changed = True
  while changed:
    changed = False
    for prefix in WRAPPER_PREFIXES:
      if state and all(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items()}
        changed = True
  return state


def _listing(items: Sequence[str]) -> str:
  shown = list(items[:_MAX_LISTED])
  more = len(items) - len(shown)
  text = ', '.join(shown)
  return text + (f', ... and {more} more' if more > 0 else '')


# ---------------------------------------------------------------------------
# The config: the seed's recipe, sized from the weights.
# ---------------------------------------------------------------------------


def _base_config(model: str) -> ml_collections.ConfigDict:
  try:
    from configs import lintunet as lintunet_config  # pylint: disable=g-import-not-at-top
    from configs import unet as unet_config  # pylint: disable=g-import-not-at-top
  except ImportError:
    # `configs/` sits next to the package in the repository.
    root = str(pathlib.Path(__file__).resolve().parents[1])
    if root not in sys.path:
      sys.path.insert(0, root)
    from configs import lintunet as lintunet_config  # pylint: disable=g-import-not-at-top
    from configs import unet as unet_config  # pylint: disable=g-import-not-at-top
  if model == 'lintunet':
    return lintunet_config.get_config('seed')
  return unet_config.get_config()


def infer_config(state: Mapping[str, np.ndarray], model: str, *,
                 image_size: int = SEED_IMAGE_SIZE, heads: int = 1,
                 normalization: str = SEED_NORMALIZATION
                 ) -> ml_collections.ConfigDict:
  """The seed's config for `model`, sized from a few anchor tensors.

  Sizes that the weights do not determine keep the seed's values (heads: 1,
  which no weight shape reveals, so it is a flag). Anchors that are missing
  or malformed leave the seed's value; the full validation then reports them.
  """
  if model not in MODELS:
    raise ConversionError(f'--model must be one of {MODELS}, got {model!r}')
  config = _base_config(model)
  m = config.model
  m.name = model

  def shape(key, ndim):
    value = state.get(key)
    return value.shape if value is not None and value.ndim == ndim else None

  if s := shape('enc1.double_conv.conv1.weight', 4):
    m.width, m.in_channels = int(s[0]), int(s[1])
  if s := shape('final_conv.weight', 4):
    m.num_classes = int(s[0])
  if model == 'lintunet':
    a = m.attention
    a.kind = 'linformer'  # the seed's attention
    if heads < 1 or (8 * m.width) % heads:
      raise ConversionError(
          f'--heads {heads} does not divide the attention width {8 * m.width}')
    a.heads = heads
    # Depth: layers 0, 1, ... present without a gap (keys of any further
    # layer are then reported as unexpected).
    present = {k[len(LINFORMER_PREFIX):].split('.', 1)[0]
               for k in state if k.startswith(LINFORMER_PREFIX)}
    depth = 0
    while str(depth) in present:
      depth += 1
    if depth:
      a.depth = depth
    first = f'{LINFORMER_PREFIX}0.0.fn.'
    if s := shape(first + 'proj_k', 2):
      a.seq_len, a.k = int(s[0]), int(s[1])
    a.share_kv = (first + 'proj_k' in state and first + 'proj_v' not in state
                  and first + 'to_v.weight' not in state)
    if (s := shape(first + 'to_q.weight', 2)) and s[0] % heads == 0:
      dim_head = int(s[0]) // heads
      a.dim_head = None if dim_head * heads == 8 * m.width else dim_head
    a.ff_mult = 4  # fixed in linformer.Linformer's FeedForward
    a.dropout = 0.0
  config.dataset.image_size = image_size
  config.dataset.normalization = normalization
  config.dataset.channels = m.in_channels
  _check_image_size(config)
  return config


def _check_image_size(config: ml_collections.ConfigDict) -> None:
  size = config.dataset.image_size
  if size <= 0 or size % models.DOWNSAMPLING:
    raise ConversionError(
        f'--image-size {size} is not a positive multiple of {models.DOWNSAMPLING}')
  if config.model.name == 'lintunet':
    tokens = (size // models.DOWNSAMPLING) ** 2
    seq_len = config.model.attention.seq_len
    if tokens > seq_len:
      raise ConversionError(
          f'--image-size {size} gives {tokens} bottleneck tokens, more than '
          f'the Linformer seq_len={seq_len} of this checkpoint (proj_k has '
          f'{seq_len} rows); the largest size it supports is '
          f'{int(seq_len ** 0.5) * models.DOWNSAMPLING}')


# ---------------------------------------------------------------------------
# Validation and conversion.
# ---------------------------------------------------------------------------


def _abstract_model(model_config: ml_collections.ConfigDict):
  return nnx.eval_shape(lambda: models.create_model(model_config))


def validate(state: Mapping[str, np.ndarray], config: ml_collections.ConfigDict,
             table: Sequence[KeyMapping] | None = None,
             abstract_state: Mapping[tuple, Any] | None = None) -> None:
  """Raises ConversionError listing every missing, extra or misshapen key."""
  model = config.model.name
  a = config.model.attention
  if table is None:
    table = key_table(model, attention_depth=a.depth, share_kv=a.share_kv)
  if abstract_state is None:
    abstract_state = _flat_state(_abstract_model(config.model))
  expected = {m.torch_key: m for m in table}
  allowed_extra = ignored_keys(model)
  missing = [m.torch_key for m in table if m.torch_key not in state]
  extra = sorted(k for k in state if k not in expected and k not in allowed_extra)
  wrong = []
  for key, mapping in expected.items():
    if key not in state:
      continue
    nnx_shape = tuple(abstract_state[mapping.nnx_path].shape)
    want = LAYOUTS[mapping.layout].torch_shape(nnx_shape)
    got = tuple(state[key].shape)
    if got != want:
      wrong.append(f'{key}: expected {want}, got {got}')
    elif not np.issubdtype(state[key].dtype, np.floating):
      wrong.append(f'{key}: expected a floating-point tensor, got {state[key].dtype}')
  for key in sorted(allowed_extra & set(state)):
    if state[key].size != 1:
      wrong.append(f'{key}: expected a scalar, got shape {tuple(state[key].shape)}')
  if not (missing or extra or wrong):
    return
  lines = [f'the checkpoint is not a seed {_pretty(model)} state dict of the '
           f'inferred size ({_describe(config)}):']
  if missing:
    lines.append(f'  missing keys ({len(missing)}): {_listing(missing)}')
  if extra:
    lines.append(f'  unexpected keys ({len(extra)}): {_listing(extra)}')
  if wrong:
    lines.append(f'  wrong shapes ({len(wrong)}): ' + _listing(wrong))
  hint = _other_model_hint(state, model, missing, extra)
  if hint:
    lines.append('  ' + hint)
  raise ConversionError('\n'.join(lines))


def _pretty(model: str) -> str:
  return {'unet': 'U-Net', 'lintunet': 'LinTUNet'}[model]


def _describe(config: ml_collections.ConfigDict) -> str:
  m = config.model
  text = f'width {m.width}, {m.in_channels} -> {m.num_classes} channels'
  if m.name == 'lintunet':
    a = m.attention
    text += (f', Linformer dim {8 * m.width} depth {a.depth} heads {a.heads} '
             f'seq_len {a.seq_len} k {a.k}')
  return text


def _other_model_hint(state, model, missing, extra) -> str | None:
  has_attention = any(k.startswith('attention.') for k in state)
  if model == 'unet' and has_attention and all(k.startswith('attention.') for k in extra):
    return ('the unexpected keys are a Linformer bottleneck: this looks like a '
            'LinTUNet checkpoint; use --model lintunet')
  if model == 'lintunet' and not has_attention and all(
      k.startswith('attention.') for k in missing):
    return ('there is no attention.linformer: this looks like a plain U-Net '
            'checkpoint; use --model unet')
  return None


def _flat_state(module: nnx.Module) -> dict[tuple, Any]:
  return {tuple(path): var for path, var in nnx.to_flat_state(nnx.state(module))}


def convert_state_dict(state: Mapping[str, np.ndarray],
                       config: ml_collections.ConfigDict) -> nnx.Module:
  """The NNX model of `config` holding the converted PyTorch weights.

  Validates first (ConversionError). Built abstractly, then every parameter
  and BatchNorm statistic is set from the table, so no random initialisation
  runs; the (unused at inference) dropout RNG streams are seeded from
  config.seed.
  """
  a = config.model.attention
  table = key_table(config.model.name, attention_depth=a.depth,
                    share_kv=a.share_kv)
  abstract = _abstract_model(config.model)
  graphdef, abstract_state = nnx.split(abstract)
  flat = _flat_state(abstract)
  validate(state, config, table, flat)

  values: dict[tuple, jax.Array] = {}
  for mapping in table:
    target = flat[mapping.nnx_path]
    array = LAYOUTS[mapping.layout].to_jax(np.asarray(state[mapping.torch_key]))
    values[mapping.nnx_path] = jnp.asarray(np.ascontiguousarray(array),
                                           dtype=target.dtype)
  rngs = nnx.Rngs(params=config.seed, dropout=config.seed + 1)
  uncovered = []
  for path, var in flat.items():
    if path in values:
      continue
    if isinstance(var, nnx.RngKey):
      values[path] = rngs[var.get_metadata()['tag']]()
    elif isinstance(var, nnx.RngCount):
      values[path] = jnp.zeros(var.shape, var.dtype)
    else:
      uncovered.append('.'.join(map(str, path)))
  if uncovered:  # the table and the NNX modules disagree: a bug, not bad input
    raise AssertionError(f'no PyTorch key maps to {uncovered}')
  state_out = nnx.from_flat_state(
      [(path, var.replace(values[path])) for path, var in flat.items()])
  return nnx.merge(graphdef, state_out)


# ---------------------------------------------------------------------------
# Writing the workdir.
# ---------------------------------------------------------------------------


def convert(checkpoint: str | os.PathLike, model: str, workdir: str | os.PathLike,
            *, image_size: int = SEED_IMAGE_SIZE, heads: int = 1,
            normalization: str = SEED_NORMALIZATION
            ) -> tuple[ml_collections.ConfigDict, nnx.Module]:
  """Converts `checkpoint` and writes the workdir; returns (config, model).

  Nothing is written unless the whole conversion succeeded. `workdir` may
  be a gs:// URL.
  """
  try:
    workdir = paths.check(workdir, '--workdir')
  except paths.UnsupportedPathError as e:
    raise ConversionError(str(e)) from None
  if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
    raise ConversionError(
        f'--workdir {workdir} exists and is not an empty directory; '
        f'choose a new one (conversion never overwrites a workdir)')
  state = load_state_dict(checkpoint)
  config = infer_config(state, model, image_size=image_size, heads=heads,
                        normalization=normalization)
  net = convert_state_dict(state, config)

  from lintunet_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
  created = not workdir.exists()
  try:
    checkpointing.write_weights_checkpoint(os.fspath(workdir), config, net, step=0)
    provenance = {
        'source': str(pathlib.Path(checkpoint).resolve()),
        'sha256': _sha256(checkpoint),
        'model': model,
        'converted_by': 'lintunet_jax.convert_torch',
        'torch_version': _import_torch().__version__,
        'parameters': models.count_parameters(net),
        'image_size': image_size,
        'normalization': normalization,
    }
    paths.write_text(workdir / 'converted_from_torch.json',
                     json.dumps(provenance, indent=2) + '\n')
  except BaseException:
    if created and workdir.exists():
      workdir.rmtree(missing_ok=True)
    raise
  return config, net


def _sha256(path) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def _parse_args(argv):
  parser = argparse.ArgumentParser(
      prog='python -m lintunet_jax.convert_torch',
      description="Convert a checkpoint of the seed's PyTorch U-Net / LinTUNet "
                  "(torch.save(model.state_dict(), ...)) into a workdir.")
  parser.add_argument('--checkpoint', required=True,
                      help='the .pth / .pt file (read with weights_only=True)')
  parser.add_argument('--model', required=True, choices=MODELS)
  parser.add_argument('--workdir', required=True,
                      help='new or empty directory to write')
  parser.add_argument('--image-size', type=int, default=SEED_IMAGE_SIZE,
                      help='model input size recorded in the config '
                           f'(default {SEED_IMAGE_SIZE}, what the notebook fed)')
  parser.add_argument('--heads', type=int, default=1,
                      help='Linformer heads (not visible in the weights; '
                           'the seed used 1)')
  parser.add_argument('--normalization', default=SEED_NORMALIZATION,
                      help="dataset.normalization to record (default 'seed': "
                           'grayscale, x/255, (x-0.5)/0.5, clamp to [0, 1], '
                           'what the notebook trained on)')
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse_args(argv)
  try:
    config, net = convert(args.checkpoint, args.model, args.workdir,
                          image_size=args.image_size, heads=args.heads,
                          normalization=args.normalization)
  except ConversionError as e:
    print(f'convert_torch: error: {e}', file=sys.stderr)
    print(f'convert_torch: nothing was written to {args.workdir}', file=sys.stderr)
    return 1
  print(f'converted {args.checkpoint} ({_pretty(args.model)}, '
        f'{models.count_parameters(net):,} parameters; {_describe(config)})\n'
        f'wrote {args.workdir}: step-0 checkpoint + config '
        f'(image_size {config.dataset.image_size}, normalization '
        f'{config.dataset.normalization!r})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
