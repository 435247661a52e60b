"""The APIB-choices benchmark's own parts: its block-output taps (against the model's own forward pass and its
hand-declared taps) and its summary arithmetic on rows built by hand; the benchmark itself runs as a program."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import models
from benchmarks import apib_choices as ac
from models._common import global_avg_pool


def test_block_output_taps_end_where_the_model_pools_and_start_at_its_declared_taps():
  model = models.random_model("resnet20", seed=3)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), jnp.float32)
  feats = ac.block_output_capture(model, "running")(images)
  assert list(feats) == model.decisions()
  # The last block's output, pooled, is what the classifier reads: its logits are the model's (an oracle that
  # does not go through the benchmark's forward pass).
  _, y_last = feats[model.decisions()[-1]]
  logits = model.fc(global_avg_pool(y_last.reshape(4, 8, 8, 64)))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(model(images)), rtol=1e-5, atol=1e-5)
  # X is the decision's conv input, as the model's own taps declare it; Y is not the pre-BN output.
  _, taps = model(images, capture=True)
  for d in model.decisions():
    x, y = feats[d]
    n, h, w, c = taps[d].input.shape
    np.testing.assert_allclose(np.asarray(x), np.asarray(jnp.transpose(taps[d].input.reshape(n, h * w, c), (0, 2, 1))),
                               rtol=1e-6, atol=1e-6)
    assert y.shape == (n, taps[d].output[0].size) and float(jnp.min(y)) >= 0.0  # after the block's ReLU


def _row(label, removed, seed, top1, keep):
  return {"label": label, "removed": removed, "seed": seed, "top1_after_surgery": top1, "keep": keep}


def test_summary_spreads_over_seeds_and_overlaps_with_the_default_row():
  default = ac.CHOICES[1].label
  rows = [_row(default, 0.3, 0, 0.90, [[0, 1], [2]]), _row(default, 0.3, 1, 0.80, [[0, 1], [2]]),
          _row("signed Lasso", 0.3, 0, 0.70, [[1, 2], [2]]), _row("signed Lasso", 0.3, 1, 0.75, [[0, 1], [3]])]
  by = {s["label"]: s for s in ac.summarise(rows)}
  assert by[default]["top1"]["mean"] == pytest.approx(0.85) and by[default]["overlap_with_default"] == 1.0
  # seed 0: layer 0 {1,2} vs {0,1} = 1/3, layer 1 = 1; seed 1: layer 0 = 1, layer 1 {3} vs {2} = 0
  assert by["signed Lasso"]["overlap_with_default"] == pytest.approx(((1 / 3 + 1) / 2 + (1 + 0) / 2) / 2)
  assert by["signed Lasso"]["top1"]["min"] == 0.70 and by["signed Lasso"]["top1"]["max"] == 0.75
  text = ac.table({"ratios": [0.3], "summary": ac.summarise(rows)})
  assert "72.50 (70.0-75.0); J 0.58" in text
