"""The attention bottleneck: what may attend to what, and how to compute it fast.

  masks.py       functional patterns `(q_index, kv_index) -> bool`, composable
  layout.py      a mask -> empty / partial / full tiles, once per shape (cached)
  xla.py         dense (reference) and block-sparse attention as XLA ops
  pallas.py      the block-sparse maths as fused Pallas (GPU) kernels, the GPU default
  bottleneck.py  the NNX modules LinTUNet puts between encoder and decoder

Imports only itself, JAX, Flax and NumPy (tests/test_dependencies.py).
The names users need are here: the mask classes and `parse_pattern`, the
attention functions and the bottleneck module.
"""

from lintunet_jax.attention.bottleneck import KINDS, AttentionBottleneck
from lintunet_jax.attention.layout import BlockLayout, block_layout
from lintunet_jax.attention.masks import (CONSTRUCTORS, CausalMask, EmptyMask,
                                          FixedMask, FullMask, GlobalTokensMask,
                                          Local2DMask, LocalMask, Mask,
                                          StridedMask, bind_grid, parse_pattern)
from lintunet_jax.attention.xla import (Schedule, block_sparse_attention,
                                        dense_attention, schedule)
