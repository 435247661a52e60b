"""The jaxtyping shape annotations of the public functions hold at run time (checked with beartype)."""

import numpy as np
import pytest
from beartype import beartype
from jaxtyping import TypeCheckError, jaxtyped

import hsic_jax as hj


def typed(fn):
  return jaxtyped(typechecker=beartype)(fn)


def test_public_annotations_hold_on_valid_calls():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(10, 3, 4)).astype(np.float32)
  y = rng.normal(size=(10, 2)).astype(np.float32)
  g = typed(hj.channel_grams)(x)
  assert g.shape == (3, 10, 10)
  k = typed(hj.gaussian_gram)(y)
  typed(hj.hsic)(k, k)
  typed(hj.problem_from_grams)(g, k)
  p = typed(hj.problem_from_features)(x, y)
  typed(hj.lambda_max)(p)
  typed(hj.lasso_select)(g, k, 0.1)


def test_annotations_catch_inconsistent_shapes():
  # The annotation ties gram_x's n to gram_y's n: the checker itself rejects a mismatch.
  g = np.zeros((3, 10, 10), np.float32)
  with pytest.raises(TypeCheckError):
    typed(hj.problem_from_grams)(g, np.zeros((9, 9), np.float32))
