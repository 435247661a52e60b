"""Models from a user's factory: ``"package.module:function"`` (or ``"path/to/file.py:function"``) names a function
that returns a Flax NNX model, so the pruning program and the checkpoint take networks outside the zoo.

The factory is called with keyword arguments only: the config's ``model.kwargs``, plus ``num_classes`` and ``rngs``
(an :class:`nnx.Rngs`) where its signature takes them (or takes ``**kwargs``). It must return an ``nnx.Module``
whose call on an ``(n, h, w, c)`` batch gives ``(n, num_classes)`` logits. Nothing else is asked of it: the
channel groups, decisions, calibration taps, costs and the thin model come from the model's jaxpr
(:mod:`hsic_jax.taps`, :func:`hsic_jax.cost_fn`, :func:`hsic_jax.thin_model`).

>>> is_factory("resnet20"), is_factory("examples.user_cnns:se_resnet")
(False, True)
>>> import_factory("math:nope")
Traceback (most recent call last):
...
ValueError: model factory 'math:nope': module 'math' has no attribute 'nope'
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx


def is_factory(name: str) -> bool:
  """Whether a model name is a factory path (``module:function``) rather than a zoo name."""
  return isinstance(name, str) and ":" in name


def _module(spec: str, name: str) -> Any:
  if spec.endswith(".py") or "/" in spec:
    path = Path(spec).expanduser().resolve()
    if not path.is_file():
      raise ValueError(f"model factory {name!r}: file {path} does not exist")
    key = f"hsic_jax_user_model_{abs(hash(str(path)))}"
    if key not in sys.modules:
      loader_spec = importlib.util.spec_from_file_location(key, path)
      if loader_spec is None or loader_spec.loader is None:
        raise ValueError(f"model factory {name!r}: {path} is not a Python file")
      module = importlib.util.module_from_spec(loader_spec)
      sys.modules[key] = module
      try:
        loader_spec.loader.exec_module(module)
      except Exception:
        del sys.modules[key]
        raise
    return sys.modules[key]
  try:
    return importlib.import_module(spec)
  except ModuleNotFoundError as e:
    raise ValueError(f"model factory {name!r}: cannot import module {spec!r} ({e}); expected a module on the Python "
                     "path (run from the directory that holds it, or pip install it) or a path to a .py file") from e


def import_factory(name: str) -> Callable[..., nnx.Module]:
  """The function named by ``"module:function"`` (a dotted module on the Python path, or a ``.py`` file's path).

  Raises:
    ValueError: not of that form, a module that cannot be found, or no such callable in it.
  """
  if not is_factory(name) or name.count(":") != 1 or not all(name.split(":")):
    raise ValueError(f"model factory {name!r} must read 'package.module:function' or 'path/to/file.py:function'")
  spec, attr = name.split(":")
  module = _module(spec, name)
  if not hasattr(module, attr):
    raise ValueError(f"model factory {name!r}: module {spec!r} has no attribute {attr!r}")
  fn = getattr(module, attr)
  if not callable(fn):
    raise ValueError(f"model factory {name!r}: {attr!r} is a {type(fn).__name__}, not a callable")
  return fn


def build(name: str, kwargs: Mapping[str, Any] | None, *, num_classes: int, rngs: nnx.Rngs) -> nnx.Module:
  """Calls the factory with ``kwargs`` and, where its signature takes them, ``num_classes`` and ``rngs``.

  Raises:
    ValueError: as :func:`import_factory`; ``kwargs`` the factory does not take; a factory that does not return an
      ``nnx.Module``.
  """
  fn = import_factory(name)
  given = dict(kwargs or {})
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):  # a builtin without a signature: pass what was asked for
    params = {}
  takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
  for key, value in (("num_classes", num_classes), ("rngs", rngs)):
    if key in given:
      raise ValueError(f"model.kwargs sets {key!r}, which the program passes itself (num_classes from the data set, "
                       "rngs from the seed); remove it")
    if takes_any or key in params:
      given[key] = value
  unknown = sorted(k for k in given if not takes_any and k not in params)
  if unknown:
    raise ValueError(f"model factory {name!r} takes no argument(s) {unknown}; its signature is "
                     f"{fn.__name__}{inspect.signature(fn)}")
  model = fn(**given)
  if not isinstance(model, nnx.Module):
    raise ValueError(f"model factory {name!r} returned a {type(model).__name__}; expected a flax.nnx.Module")
  return model


def build_abstract(name: str, kwargs: Mapping[str, Any] | None, *, num_classes: int) -> nnx.Module:
  """The factory's model with abstract arrays (:func:`nnx.eval_shape`: shapes and dtypes, nothing initialised)."""
  return nnx.eval_shape(lambda: build(name, kwargs, num_classes=num_classes, rngs=nnx.Rngs(0)))


@dataclasses.dataclass(frozen=True)
class FactorySpec:
  """A model from a factory, as a checkpoint records it: the factory path, its keyword arguments and the input
  shape (batch 1) on which the model's jaxpr is traced (groups, decisions, costs and the thin model's check)."""

  name: str
  kwargs: Mapping[str, Any]
  input_shape: tuple[int, ...]

  def __post_init__(self) -> None:
    if not is_factory(self.name):
      raise ValueError(f"model factory {self.name!r} must read 'package.module:function'")
    shape = tuple(int(s) for s in self.input_shape)
    if len(shape) < 2 or any(s < 1 for s in shape):
      raise ValueError(f"model factory {self.name!r}: input_shape must be an input shape like (2, 32, 32, 3), got "
                       f"{self.input_shape!r}")
    object.__setattr__(self, "input_shape", shape)
    object.__setattr__(self, "kwargs", dict(self.kwargs or {}))

  def example(self) -> np.ndarray:
    """Zeros of :attr:`input_shape` (float32): an example input for tracing (only its shape matters)."""
    return np.zeros(self.input_shape, np.float32)

  def build(self, *, num_classes: int, rngs: nnx.Rngs) -> nnx.Module:
    return build(self.name, self.kwargs, num_classes=num_classes, rngs=rngs)

  def build_zeros(self, *, num_classes: int) -> nnx.Module:
    """The factory's model with every array zero, built abstractly (no initializer runs): a skeleton to put a saved
    state in, or to cut to a saved plan."""
    abstract = build_abstract(self.name, self.kwargs, num_classes=num_classes)
    graphdef, state = nnx.split(abstract)
    state = jax.tree.map(lambda v: np.zeros(v.shape, v.dtype), state)
    return nnx.merge(graphdef, state)

  def meta(self) -> dict[str, Any]:
    return {"model": self.name, "kwargs": dict(self.kwargs), "input_shape": list(self.input_shape)}

  @classmethod
  def from_meta(cls, meta: Mapping[str, Any]) -> FactorySpec:
    return cls(meta["model"], meta.get("kwargs") or {}, tuple(meta["input_shape"]))


def num_outputs(model: nnx.Module, example: Any) -> int:
  """The size of the last axis of ``model``'s first output on ``example`` (its class count), found abstractly.

  Raises:
    ValueError: the model fails on ``example``, or its output is not ``(batch, classes)``.
  """
  graphdef, state = nnx.split(model)
  try:
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, example)
  except Exception as e:  # pylint: disable=broad-except  (any failure: the model does not take this input)
    raise ValueError(f"the {type(model).__name__} fails on an input of shape {tuple(np.shape(example))} "
                     f"({type(e).__name__}: {str(e)[:300]}); expected NHWC images of the data set's size") from e
  first = jax.tree_util.tree_leaves(out)[0]
  if len(first.shape) != 2:
    raise ValueError(f"the {type(model).__name__} gives an output of shape {tuple(first.shape)} on an input of shape "
                     f"{tuple(np.shape(example))}; expected (batch, classes) logits")
  return int(first.shape[-1])
