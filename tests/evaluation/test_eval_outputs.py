"""eval.py and predict.py write what they wrote before the evaluation
redesign for tests/fixtures/tiny_workdir: reports (plain, on the model's
canvas, window + flips + ensemble), per-case files and predicted masks and
logits (fixture recorded by tests/evaluation/eval_outputs.py before it).
A change in what any path computes or writes fails here."""

from __future__ import annotations

import json

import pytest

from tests.evaluation import eval_outputs


@pytest.mark.slow
def test_outputs_equal_the_recorded_ones(tmp_path):
  want = json.loads(eval_outputs.FIXTURE.read_text())
  got = json.loads(json.dumps(eval_outputs.record(str(tmp_path))))
  assert sorted(got) == sorted(want)
  for key in want:
    assert got[key] == want[key], key
