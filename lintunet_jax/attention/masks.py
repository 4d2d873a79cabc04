"""Functional attention masks: *what* may attend to *what*.

A mask is a pure function `(q_index, kv_index) -> bool` over token indices,
evaluated elementwise on broadcasting integer arrays. The same object is
evaluated with NumPy at trace time (to find which tiles of the score matrix
are empty, partial or full; see `layout`) and with jax.numpy inside
the compiled kernel (to mask partial tiles). It therefore uses only
operators that both libraries share: comparisons, `//`, `%`, `&`, `|`, `~`.

Masks compose like FlexAttention's `and_masks` / `or_masks` and splash
attention's mask classes: `local_1d(window=4) | global_tokens(num=1)`.
Every mask is a frozen dataclass, hence hashable, so layouts computed from
it are cached per (mask, sequence length, tile size).

All patterns here are bidirectional (an image has no time direction);
intersect with `causal()` for the autoregressive variants of Child et al.
"""

from __future__ import annotations

import ast
import dataclasses
from typing import Any


class Mask:
  """Base class: a pure predicate over (query index, key index) arrays."""

  def __call__(self, q, kv):
    raise NotImplementedError

  def __and__(self, other: 'Mask') -> 'Mask':
    return AndMask(self, other)

  def __or__(self, other: 'Mask') -> 'Mask':
    return OrMask(self, other)

  def __invert__(self) -> 'Mask':
    return NotMask(self)


@dataclasses.dataclass(frozen=True)
class AndMask(Mask):
  left: Mask
  right: Mask

  def __call__(self, q, kv):
    return self.left(q, kv) & self.right(q, kv)


@dataclasses.dataclass(frozen=True)
class OrMask(Mask):
  left: Mask
  right: Mask

  def __call__(self, q, kv):
    return self.left(q, kv) | self.right(q, kv)


@dataclasses.dataclass(frozen=True)
class NotMask(Mask):
  inner: Mask

  def __call__(self, q, kv):
    return ~self.inner(q, kv)


@dataclasses.dataclass(frozen=True)
class FullMask(Mask):
  """Every query sees every key: dense attention as a pattern."""

  def __call__(self, q, kv):
    return (q >= 0) | (kv >= 0)


@dataclasses.dataclass(frozen=True)
class EmptyMask(Mask):
  """No query sees any key (useful to test the all-masked convention)."""

  def __call__(self, q, kv):
    return (q < 0) & (kv < 0)


@dataclasses.dataclass(frozen=True)
class CausalMask(Mask):
  def __call__(self, q, kv):
    return kv <= q


@dataclasses.dataclass(frozen=True)
class LocalMask(Mask):
  """1-D sliding window: |q - kv| < window (Child et al.'s local head)."""

  window: int

  def __post_init__(self):
    _check_positive(window=self.window)

  def __call__(self, q, kv):
    return (q - kv < self.window) & (kv - q < self.window)


@dataclasses.dataclass(frozen=True)
class StridedMask(Mask):
  """Child et al.'s strided head: keys a whole number of strides away.

  Together with a local window of the same size, every token reaches every
  other in two hops, which is why Sparse Transformers pair the two.
  """

  stride: int

  def __post_init__(self):
    _check_positive(stride=self.stride)

  def __call__(self, q, kv):
    return (q - kv) % self.stride == 0


@dataclasses.dataclass(frozen=True)
class FixedMask(Mask):
  """Child et al.'s fixed pattern: own block of `block`, plus summary columns.

  The last `summary` positions of every block act as summaries every query
  attends to (A(1) and A(2) of the paper's "fixed" attention, bidirectional).
  """

  block: int
  summary: int = 1

  def __post_init__(self):
    _check_positive(block=self.block, summary=self.summary)
    if self.summary > self.block:
      raise ValueError(f'fixed(): summary={self.summary} > block={self.block}')

  def __call__(self, q, kv):
    same_block = q // self.block == kv // self.block
    is_summary = kv % self.block >= self.block - self.summary
    return same_block | is_summary


@dataclasses.dataclass(frozen=True)
class GlobalTokensMask(Mask):
  """The first `num` tokens attend everywhere and are attended by all."""

  num: int

  def __post_init__(self):
    _check_positive(num=self.num)

  def __call__(self, q, kv):
    return (q < self.num) | (kv < self.num)


@dataclasses.dataclass(frozen=True)
class Local2DMask(Mask):
  """A (2r+1)x(2r+1) window on the H x W token grid of an image.

  Tokens are the row-major flattening of the grid, so a 1-D window would
  wrap across rows; this one respects the grid. `grid_width` is filled in by
  `bind_grid` from the bottleneck's actual width when it is left at 0.
  """

  radius: int
  grid_width: int = 0

  def __post_init__(self):
    _check_positive(radius=self.radius)

  def __call__(self, q, kv):
    if self.grid_width <= 0:
      raise ValueError('local_2d() needs the grid width; call bind_grid() '
                       'or pass grid_width=')
    qr, qc = q // self.grid_width, q % self.grid_width
    kr, kc = kv // self.grid_width, kv % self.grid_width
    r = self.radius
    return ((qr - kr <= r) & (kr - qr <= r) & (qc - kc <= r) & (kc - qc <= r))


def _check_positive(**values: int) -> None:
  for name, value in values.items():
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f'{name} must be a positive integer, got {value!r}')


def bind_grid(mask: Mask, grid_width: int) -> Mask:
  """Returns `mask` with every unbound 2-D window told the grid width."""
  if isinstance(mask, Local2DMask) and mask.grid_width <= 0:
    return dataclasses.replace(mask, grid_width=grid_width)
  if isinstance(mask, (AndMask, OrMask)):
    return type(mask)(bind_grid(mask.left, grid_width),
                      bind_grid(mask.right, grid_width))
  if isinstance(mask, NotMask):
    return NotMask(bind_grid(mask.inner, grid_width))
  return mask


# Names usable in config strings, e.g. 'local_2d(radius=2) | strided(stride=16)'.
CONSTRUCTORS = {
    'full': FullMask,
    'empty': EmptyMask,
    'causal': CausalMask,
    'local_1d': LocalMask,
    'strided': StridedMask,
    'fixed': FixedMask,
    'global_tokens': GlobalTokensMask,
    'local_2d': Local2DMask,
}


def parse_pattern(spec: str) -> Mask:
  """Parses a pattern expression from a config string.

  Grammar: constructor calls from `CONSTRUCTORS` with integer arguments,
  combined with `|`, `&`, `~` and parentheses. Nothing is evaluated as
  Python, so a config file cannot run code through this string.
  """
  try:
    tree = ast.parse(spec.strip(), mode='eval')
  except SyntaxError as e:
    raise ValueError(f'attention pattern {spec!r} is not an expression: {e.msg}') from None
  return _build(tree.body, spec)


def _build(node: ast.AST, spec: str) -> Mask:
  if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.BitOr, ast.BitAnd)):
    left, right = _build(node.left, spec), _build(node.right, spec)
    return left | right if isinstance(node.op, ast.BitOr) else left & right
  if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Invert):
    return ~_build(node.operand, spec)
  if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
    name = node.func.id
    if name not in CONSTRUCTORS:
      raise ValueError(f'unknown mask {name!r} in pattern {spec!r}; '
                       f'known: {", ".join(sorted(CONSTRUCTORS))}')
    args = [_literal(a, spec) for a in node.args]
    kwargs = {kw.arg: _literal(kw.value, spec) for kw in node.keywords}
    try:
      return CONSTRUCTORS[name](*args, **kwargs)
    except TypeError as e:
      raise ValueError(f'bad arguments for {name}() in pattern {spec!r}: {e}') from None
  raise ValueError(f'pattern {spec!r}: expected mask calls joined by | & ~, '
                   f'found {ast.unparse(node)!r}')


def _literal(node: ast.AST, spec: str) -> Any:
  if isinstance(node, ast.Constant) and isinstance(node.value, int):
    return node.value
  raise ValueError(f'pattern {spec!r}: arguments must be integers, '
                   f'found {ast.unparse(node)!r}')
