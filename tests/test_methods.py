"""hsic_jax.methods: the registry (names, unknown names, registration errors), the evidence each method declares,
the channels that fill a method's widths, and a user-registered method run by the program's select stage."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

import hsic_jax as hj
import models
from hsic_jax import budget, methods
from train import calibrate, files, pipeline
from train.configs import digits_apib


def _sum_cost(w):
  return {"macs": float(sum(w)), "params": 2.0 * float(sum(w))}


def _half(evidence, cost, target, *, key, sizes, multiple, settings, progress=None):
  """Every decision at half its size (a user's method that needs no evidence)."""
  widths = tuple(budget.round_width(s // 2, s, multiple=multiple) for s in sizes)
  costs = budget.costs_at(cost, widths, (key,))
  if progress is not None:
    progress(budget.BudgetPoint(0.5, widths, costs, "bound"))
  return budget.BudgetResult("half", widths, costs, key, target, costs[key] <= target, (0.0, costs[key]),
                             value=0.5, extras={"offset": settings.get("offset", 0)})


@pytest.fixture
def half():
  hj.register_method("half", _half, needs=())
  yield
  hj.unregister_method("half")


def test_names_and_unknown_names():
  assert hj.method_names()[:4] == ("apib", "itpruner", "uniform", "global")
  for call in (lambda: hj.method_needs("lottery", "l1"), lambda: methods.get_method("lottery"),
               lambda: hj.unregister_method("lottery")):
    with pytest.raises(ValueError, match=r"^unknown selection method 'lottery'; expected one of \['apib', "):
      call()
  with pytest.raises(ValueError, match=r"^unknown criterion 'no_such'; expected 'hsic_lasso' or one of .*'fpgm'"):
    hj.method_needs("uniform", "no_such")


def test_evidence_declared_by_each_method_and_criterion():
  want = {"apib": {"problems"}, "itpruner": {"similarity"}, "uniform": set(), "global": {"scores"}}
  for name, needs in want.items():
    assert methods.get_method(name).needs == needs
    assert hj.method_needs(name, "l1") == needs | {"scores"}
    if name != "global":
      assert hj.method_needs(name, "hsic_lasso") == needs | {"problems"}
  with pytest.raises(ValueError, match=r"'global' ranks a criterion's scores, and 'hsic_lasso' has none"):
    hj.method_needs("global", "hsic_lasso")


def test_registration_errors(half):
  with pytest.raises(ValueError, match="already registered"):
    hj.register_method("half", _half, needs=())
  with pytest.raises(ValueError, match="unknown"):
    hj.register_method("other", _half, needs={"grads"})
  with pytest.raises(ValueError, match="keeps"):
    hj.register_method("other", _half, needs=(), keeps="similarity")
  with pytest.raises(ValueError, match="callable"):
    hj.register_method("other", None, needs=())
  assert "other" not in hj.method_names()


def test_select_fills_the_widths_with_the_criterion_and_names_missing_evidence(half):
  scores = [np.array([0.1, 0.9, 0.5, 0.7]), np.array([3.0, 1.0])]
  res = hj.select("half", "l1", hj.Evidence(scores=scores), _sum_cost, 3.0, key="macs", sizes=[4, 2], multiple=1,
                  settings={})
  assert res.widths == (2, 1) and [k.tolist() for k in res.keep] == [[1, 3], [0]]  # each decision's top scores
  with pytest.raises(ValueError, match=r"'half' with criterion 'l1' needs evidence \['scores'\]"):
    hj.select("half", "l1", hj.Evidence(), _sum_cost, 3.0, key="macs", sizes=[4, 2], multiple=1, settings={})
  # A method's own keep is used where it comes from the criterion's evidence (``keeps``), else the criterion's.
  lowest = lambda *a, **k: dataclasses.replace(_half(*a, **k), keep=(np.array([0, 2]), np.array([1])))  # noqa: E731
  for keeps, want in (("scores", [[0, 2], [1]]), ("problems", [[1, 3], [0]]), (None, [[1, 3], [0]])):
    hj.register_method("lowest", lowest, needs=(), keeps=keeps)
    res = hj.select("lowest", "l1", hj.Evidence(scores=scores), _sum_cost, 3.0, key="macs", sizes=[4, 2], multiple=1,
                    settings={})
    hj.unregister_method("lowest")
    assert [k.tolist() for k in res.keep] == want, keeps


def test_a_user_method_runs_in_the_programs_select_stage(half, tmp_path):
  cfg = digits_apib.get_config()
  cfg.select.method, cfg.select.criterion = "half", "l1"
  model = models.get_model(cfg.model.name, rngs=nnx.Rngs(0))
  run = pipeline.Run(cfg, tmp_path, pipeline.train_lib.make_mesh(jax.devices()[:1]), True)
  run.save_model(model, "dense", {"stage": "dense"})
  pairs = calibrate.decision_groups(model)
  rng = np.random.default_rng(0)
  scores = [rng.normal(size=g.size) for _, g in pairs]
  (tmp_path / "calibration").mkdir()
  files.save_npz(tmp_path / "calibration" / "scores.npz", decisions=np.asarray([d for d, _ in pairs]),
                 **{str(i): s for i, s in enumerate(scores)})
  pipeline.stage_select(run)
  sel = json.loads((tmp_path / "selection.json").read_text())
  assert sel["method"] == "half" and [d["kept"] for d in sel["decisions"]] == [g.size // 2 for _, g in pairs]
  for (_, g), s in zip(pairs, scores):
    assert sel["keep"][g.name] == sorted(np.argsort(-s, kind="stable")[:g.size // 2].tolist())
  assert sel["value"] == 0.5 and sel["extras"] == {"offset": 0}  # the default record of a user's method
