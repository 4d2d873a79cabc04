"""The measurement logic of `lintunet_jax.evaluation.throughput` (never the timings).

A fake clock and a counting function check what is timed: compile outside,
warm-up calls untimed, one timing per call covering `block_until_ready`,
statistics and derived numbers computed from those timings.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import lintunet
from lintunet_jax import models
from lintunet_jax.training import parallel
from lintunet_jax.evaluation import throughput


class FakeClock:
  """Returns preset times; each call of fn advances by a preset duration."""

  def __init__(self, durations):
    self.durations = list(durations)
    self.now = 0.0
    self.reads = 0

  def __call__(self):
    self.reads += 1
    return self.now

  def advance(self):
    self.now += self.durations.pop(0)


def test_summarize():
  s = throughput.summarize([3.0, 1.0, 2.0, 10.0, 4.0])
  assert s['median'] == 3.0 and s['min'] == 1.0 and s['max'] == 10.0
  assert s['count'] == 5 and s['mean'] == 4.0
  assert s['p10'] == pytest.approx(np.percentile([1, 2, 3, 4, 10], 10))
  assert s['std'] == pytest.approx(np.std([1, 2, 3, 4, 10], ddof=1))
  assert throughput.summarize([2.0])['std'] == 0.0
  with pytest.raises(ValueError):
    throughput.summarize([])


def test_time_calls_warmup_untimed_and_blocks(monkeypatch):
  calls, blocked = [], []
  clock = FakeClock([0.5, 0.1, 0.2, 0.3])

  def fn(x):
    calls.append(x)
    if len(calls) > 2:  # warm-up calls do not move the clock
      clock.advance()
    return ('out', len(calls))

  real_block = jax.block_until_ready
  monkeypatch.setattr(jax, 'block_until_ready',
                      lambda out: blocked.append(out) or real_block(out))
  times = throughput.time_calls(fn, (7,), warmup=2, runs=4, clock=clock)
  assert times == pytest.approx([0.5, 0.1, 0.2, 0.3])
  assert len(calls) == 6
  # Every call (warm-up included) is waited for, each on its own outputs.
  assert blocked == [('out', i) for i in range(1, 7)]
  assert clock.reads == 8  # two reads per timed call, none in warm-up
  with pytest.raises(ValueError):
    throughput.time_calls(fn, (7,), runs=0)


def test_benchmark_derived_numbers():
  """images/s, FLOPs and FLOP/s follow from the timings and cost analysis."""
  n = 64
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  expected_flops = throughput.cost_analysis_flops(f.lower(a, a).compile())
  assert expected_flops == pytest.approx(2 * n ** 3, rel=0.01)

  # Timed calls read the clock twice: start, end. Durations 40,10,20,30,50 ms.
  reads = iter([0.0, 0.04, 1.0, 1.01, 2.0, 2.02, 3.0, 3.03, 4.0, 4.05])
  clock = lambda: next(reads)
  r = throughput.benchmark(f, a, a, items=8, warmup=0, runs=5,
                           clock=clock, peak_flops=1e12)
  assert r['latency_s']['median'] == pytest.approx(0.03)
  assert r['latency_s']['min'] == pytest.approx(0.01)
  assert r['images_per_s']['median'] == pytest.approx(8 / 0.03)
  assert r['images_per_s']['min'] == pytest.approx(8 / 0.05)
  assert r['images_per_s']['max'] == pytest.approx(8 / 0.01)
  assert r['flops_per_batch'] == expected_flops
  assert r['flops_per_image'] == pytest.approx(expected_flops / 8)
  assert r['achieved_flops_per_s'] == pytest.approx(expected_flops / 0.03)
  assert r['fraction_of_peak'] == pytest.approx(expected_flops / 0.03 / 1e12)
  assert r['timed_runs'] == 5 and r['warmup_runs'] == 0
  json.dumps(r)


def test_cost_analysis_flops_formats():
  class C:
    def __init__(self, value):
      self.value = value

    def cost_analysis(self):
      if isinstance(self.value, Exception):
        raise self.value
      return self.value

  assert throughput.cost_analysis_flops(C({'flops': 10.0})) == 10.0
  assert throughput.cost_analysis_flops(C([{'flops': 12.0}])) == 12.0  # older JAX
  assert throughput.cost_analysis_flops(C(None)) is None
  assert throughput.cost_analysis_flops(C([])) is None
  assert throughput.cost_analysis_flops(C({'flops': -1.0})) is None
  assert throughput.cost_analysis_flops(C(NotImplementedError())) is None


def test_peak_table():
  peak, source = throughput.peak_flops_per_s('NVIDIA H100 80GB HBM3', 'bfloat16', 2)
  assert peak == 2 * 989e12 and 'H100' in source
  assert throughput.peak_flops_per_s('NVIDIA H100 PCIe', 'float32')[0] == 378e12
  assert throughput.peak_flops_per_s('cpu', 'float32') == (None, None)


def _tiny_config(name='lintunet'):
  config = lintunet.get_config('quick')
  config.model.name = name
  config.model.width = 4
  config.dataset.image_size = 32
  config.model.attention.seq_len = 4
  config.model.attention.k = 4
  config.model.attention.block_size = 2
  config.eval_batch_size = 4
  return config


@pytest.mark.slow
def test_inference_throughput_report_on_tiny_model():
  config = _tiny_config()
  model = models.create_model(config.model)
  result = throughput.inference_throughput(
      model, config, batch_sizes=(1, 2, 2), warmup=1, runs=3,
      mesh=parallel.create_mesh(), peak_flops=1e9)
  json.dumps(result)
  assert [b['batch_size'] for b in result['batches']] == [1, 2]
  assert result['device_count'] == jax.device_count()
  assert result['input_shape'] == [32, 32, 1]
  assert result['dtype'] == 'float32'
  one, two = result['batches']
  assert one['latency_s']['count'] == 3 and one['timed_runs'] == 3
  assert one['flops_per_image'] > 0
  # FLOPs scale with the batch: per-image FLOPs agree across batch sizes.
  assert two['flops_per_image'] == pytest.approx(one['flops_per_image'], rel=0.05)
  assert one['achieved_flops_per_s'] == pytest.approx(
      one['flops_per_batch'] / one['latency_s']['median'])
  assert one['peak_flops_per_s'] == 1e9 * one['devices_used']
  assert throughput.headline(result)['batch_size'] == 2
  table = throughput.format_throughput_table(result)
  assert 'images/s' in table and len(table.splitlines()) == 4


def test_timed_forward_is_inference_mode(monkeypatch):
  """What benchmark_forward times is the eval-mode forward: BatchNorm uses
  its running statistics, not the batch's, and none are written back."""
  model = models.create_model(_tiny_config().model)
  # Running statistics far from a batch's, so the two modes differ clearly.
  rng = np.random.default_rng(1)
  stats = nnx.state(model, nnx.BatchStat)
  nnx.update(model, jax.tree.map(
      lambda x: jnp.asarray(rng.uniform(0.5, 2.0, x.shape), x.dtype), stats))
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  timed = {}
  real_benchmark = throughput.benchmark

  def spy(fn, *args, **kwargs):
    timed['fn'], timed['args'] = fn, args
    return real_benchmark(fn, *args, **kwargs)

  monkeypatch.setattr(throughput, 'benchmark', spy)
  throughput.benchmark_forward(model, batch_size=2, image_shape=(32, 32, 1),
                               warmup=0, runs=1)
  state, images = timed['args']
  got = np.asarray(jax.jit(timed['fn'])(state, images))
  reference = nnx.clone(model)
  reference.eval()
  want = np.asarray(reference(images))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  training = nnx.clone(model)
  training.train()
  batch_statistics = np.asarray(training(images))
  assert np.abs(batch_statistics - want).max() > 1e-2  # the modes differ
  after = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  jax.tree.map(np.testing.assert_array_equal, before, after)


def test_carry_threads_a_donated_state():
  """A train-step-like function that donates its state can be timed."""

  @jax.jit
  def step(state, x):
    return state + x.sum(), {'loss': x.mean()}

  donating = jax.jit(step, donate_argnums=0)
  state = jnp.zeros((4,), jnp.float32)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)), jnp.float32)
  r = throughput.benchmark(donating, state, x, items=3, warmup=2, runs=3,
                           carry=True)
  assert r['latency_s']['count'] == 3 and r['batch_size'] == 3
  # Without carry the second call would reuse a donated (deleted) buffer.
  seen = []

  def counting(s, x):
    seen.append(float(s[0]))
    return step(s, x)

  fresh = jnp.zeros((4,), jnp.float32)  # `state` was donated above
  throughput.time_calls(counting, (fresh, x), warmup=1, runs=2, carry=True)
  total = float(x.sum())
  assert seen == pytest.approx([0.0, total, 2 * total])
