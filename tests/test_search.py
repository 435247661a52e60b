"""The global lambda search: widths from independent solves at the chosen lambda, the target band, rounding, the
omega floor, the fill step and the reachable-range error."""

import numpy as np
import pytest

import hsic_jax as hj


def _problems(seed=0, n=48, widths=(12, 8, 16)):
  rng = np.random.default_rng(seed)
  out = []
  for c in widths:
    x = rng.normal(size=(n, c, 3)).astype(np.float32)
    # Each layer's output depends on a few of its channels, with different strengths.
    y = np.concatenate([np.sin(2 * x[:, 0]), 0.7 * x[:, 1] ** 2, 0.3 * x[:, 2], 0.1 * np.abs(x[:, 3])], 1)
    out.append(hj.problem_from_features(x, y))
  return out


def _channels(w):
  return {"channels": float(sum(w)), "weighted": float(sum((i + 1) * v for i, v in enumerate(w)))}


def test_widths_are_the_supports_at_the_chosen_lambda():
  problems = _problems()
  res = hj.global_lambda_search(problems, _channels, target=14.0, key="channels", tolerance=0.0)
  assert res.reached and sum(res.widths) == 14
  # Independent check: solve every layer alone at the returned lambda.
  for p, w, k in zip(problems, res.widths, res.keep):
    alone = hj.solve(p, res.value)
    support = int(np.asarray(alone.selected).sum())
    assert w == max(support, 1)
    if support >= 1:
      assert set(k.tolist()) == set(alone.indices().tolist())
  assert [p.phase for p in res.trace][:25] == ["grid"] * 25
  # The trace records every point with both costs.
  assert all({"channels", "weighted"} <= set(p.costs) for p in res.trace)


def test_rounding_to_a_multiple_still_hits_the_target():
  problems = _problems()
  res = hj.global_lambda_search(problems, _channels, target=20.0, key="channels", multiple=4, tolerance=0.0)
  assert res.reached and sum(res.widths) == 20
  assert all(w % 4 == 0 or w == size for w, size in zip(res.widths, (12, 8, 16)))
  assert [len(k) for k in res.keep] == list(res.widths)


def test_omega_floor_and_reachable_range():
  problems = _problems()
  res = hj.global_lambda_search(problems, _channels, target=9.0, key="channels", omega=3, tolerance=0.0)
  assert min(res.widths) >= 3 and sum(res.widths) == 9
  assert res.reachable[0] == 9.0
  with pytest.raises(ValueError, match="outside what the search can reach: reachable range"):
    hj.global_lambda_search(problems, _channels, target=5.0, key="channels", omega=3)
  with pytest.raises(ValueError, match="outside what the search can reach: reachable range"):
    hj.global_lambda_search(problems, _channels, target=1000.0, key="channels")


def test_fill_lands_in_the_band_when_lambda_steps_jump_over_it():
  # A cost where one width step is larger than the band: the lambda bisection alone cannot land in it.
  problems = _problems()
  res = hj.global_lambda_search(problems, _channels, target=31.0, key="weighted", tolerance=0.0, fill=True)
  assert res.reached and res.costs["weighted"] == 31.0
  no_fill = hj.global_lambda_search(problems, _channels, target=31.0, key="weighted", tolerance=0.0, fill=False)
  assert no_fill.costs["weighted"] <= 31.0


@pytest.mark.parametrize("kw, match", [({"omega": 0}, "omega"), ({"multiple": 1.5}, "multiple"),
                                       ({"tolerance": 2.0}, "tolerance"), ({"target": -1.0}, "target"),
                                       ({"grid": 1}, "grid")])
def test_bad_arguments(kw, match):
  args = {"target": 10.0, **kw}
  with pytest.raises(ValueError, match=match):
    hj.global_lambda_search(_problems(), _channels, key="channels", **args)


def test_stacks_by_width_and_one_padded_stack_agree():
  problems = _problems(widths=(12, 8, 16, 8))
  a = hj.global_lambda_search(problems, _channels, target=16.0, key="channels", bucket=True)
  b = hj.global_lambda_search(problems, _channels, target=16.0, key="channels", bucket=False)
  assert a.widths == b.widths and all(np.array_equal(x, y) for x, y in zip(a.keep, b.keep))
  np.testing.assert_allclose([p.value for p in a.trace], [p.value for p in b.trace], rtol=1e-6)
