"""The project's model checkpoint: a registry model or a factory's model saved as an orbax composite, and rebuilt
from it.

A checkpoint is one orbax composite directory with item ``state`` (the pure state dict,
``nnx.to_pure_dict(nnx.state(model))``) and item ``meta`` (JSON ``{"model", "widths", "num_classes"}`` plus any
entries the writer adds, e.g. a pruned model's plan), so :func:`load` rebuilds the model with the widths it was
saved with. A model from a user's factory (:mod:`models.factory`) records the factory path as ``model``, its
``kwargs`` and the ``input_shape`` its jaxpr is traced at (``widths`` is ``None``); :func:`load` calls the factory
(abstractly: nothing initialised), cuts the model to the meta's ``plan`` where there is one
(:func:`hsic_jax.thin_model` on groups derived from the jaxpr, as the pruning did) and fills in the saved arrays,
every shape checked.

:func:`build_with_state` is the one way a model of the zoo is made from a pure dict of arrays (a checkpoint's
state, PyTorch weights converted by :mod:`models.import_torch`, a state cut by :func:`hsic_jax.prune`): it builds
the model abstractly (shapes only, nothing initialised) and checks every array's shape before filling it in, since
``nnx.update`` and ``nnx.replace_by_pure_dict`` accept wrongly shaped arrays silently.

>>> import numpy as np, jax
>>> from models import checkpoint
>>> shapes = checkpoint.abstract_state("resnet20")
>>> state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
>>> checkpoint.build_with_state("resnet20", None, None, state).stage1.block0.conv1.kernel.shape
(3, 3, 16, 16)
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from flax.nnx import traversals

import models as registry
from models.factory import FactorySpec, is_factory, num_outputs

META_KEYS = ("model", "widths", "num_classes")


@functools.lru_cache(maxsize=32)
def _skeleton(name: str, widths: tuple[int, ...] | None, num_classes: int | None) -> tuple[Any, nnx.State]:
  """``(graphdef, abstract state)`` of a zoo model, cached: building one abstractly traces its constructor (about
  0.5 s for ResNet-50), and a run loads the same architecture several times."""
  model = nnx.eval_shape(lambda: registry.get_model(name, None if widths is None else list(widths),
                                                    num_classes=num_classes, rngs=nnx.Rngs(0)))
  return nnx.split(model)


def _key(widths: Sequence[int] | None) -> tuple[int, ...] | None:
  return None if widths is None else tuple(int(w) for w in widths)


def abstract_state(name: str, widths: Sequence[int] | None = None, num_classes: int | None = None) -> dict[str, Any]:
  """The pure state dict of model ``name`` built with ``widths``, as :class:`jax.ShapeDtypeStruct` leaves (no array
  is allocated).

  Raises:
    ValueError: an unknown name, or widths or a class count :func:`models.get_model` rejects.
  """
  _, state = _skeleton(name, _key(widths), num_classes)
  return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(state))


def _flat_shapes(tree: Mapping[str, Any]) -> dict[tuple[str, ...], tuple[int, ...]]:
  return {tuple(str(k) for k in path): tuple(np.shape(v)) for path, v in traversals.flatten_mapping(tree).items()}


def _where(path: Sequence[str]) -> str:
  return "".join(f"[{k!r}]" for k in path)


def build_with_state(name: str, widths: Sequence[int] | None, num_classes: int | None,
                     state: Mapping[str, Any]) -> nnx.Module:
  """Model ``name`` with ``widths`` and ``num_classes`` classes, holding the arrays of the pure dict ``state``.

  Args:
    name: a registry name (:data:`models.MODELS`).
    widths: the width list the arrays were cut to; ``None`` for the dense widths.
    num_classes: classifier outputs; ``None`` for the registry's default.
    state: a pure dict shaped like ``nnx.to_pure_dict(nnx.state(model))``: every parameter and BatchNorm
      statistic, no other entry, each with the shape the widths build.

  Returns:
    The model, in eval mode (BatchNorm uses the running statistics of ``state``).

  Raises:
    ValueError: an unknown name or invalid widths; entries of ``state`` missing or unexpected (listed); an array whose
      shape is not the one ``widths`` builds (naming its path, both shapes and the widths).
  """
  graphdef, skeleton = _skeleton(name, _key(widths), num_classes)
  shown = list(widths) if widths is not None else "dense"
  return _filled(graphdef, skeleton, state, f"{name} with widths {shown}")


def _check_shapes(skeleton: nnx.State, state: Mapping[str, Any], what: str) -> None:
  """Raises ValueError unless ``state`` holds exactly the variables of ``skeleton``, each of its shape."""
  want = _flat_shapes(nnx.to_pure_dict(skeleton))
  have = _flat_shapes(state)
  missing = sorted(set(want) - set(have))
  unexpected = sorted(set(have) - set(want))
  if missing or unexpected:
    raise ValueError(f"state for {what} does not hold its variables: missing "
                     f"{[_where(p) for p in missing[:10]]}{' ...' if len(missing) > 10 else ''}, unexpected "
                     f"{[_where(p) for p in unexpected[:10]]}{' ...' if len(unexpected) > 10 else ''}")
  for path, shape in want.items():
    if have[path] != shape:
      raise ValueError(f"state{_where(path)} has shape {have[path]}, expected {shape} for {what}")


def _filled(graphdef: Any, skeleton: nnx.State, state: Mapping[str, Any], what: str) -> nnx.Module:
  """The model of ``graphdef`` holding the arrays of ``state`` (shapes checked against ``skeleton``), eval mode."""
  _check_shapes(skeleton, state, what)
  fresh = nnx.from_flat_state(nnx.to_flat_state(skeleton))  # a new container: the cached skeleton stays abstract
  nnx.replace_by_pure_dict(fresh, jax.tree.map(jnp.asarray, dict(state)))
  model = nnx.merge(graphdef, fresh)
  model.eval()
  return model


def _check_state_matches_widths(model: nnx.Module) -> None:
  """Raises ValueError when ``model``'s parameters do not have the shapes its width list builds (a state cut by
  surgery but put back in a model of the old widths, or the reverse), which would only surface on loading."""
  name = registry.model_name(model)
  want = jax.tree_util.tree_map(lambda v: tuple(v.shape), abstract_state(name, model.widths, int(model.num_classes)))
  have = jax.tree_util.tree_map(lambda v: tuple(np.shape(v)), nnx.to_pure_dict(nnx.state(model)))
  want_flat = dict(jax.tree_util.tree_flatten_with_path(want, is_leaf=lambda x: isinstance(x, tuple))[0])
  have_flat = dict(jax.tree_util.tree_flatten_with_path(have, is_leaf=lambda x: isinstance(x, tuple))[0])
  for key in sorted(set(want_flat) | set(have_flat), key=str):
    w, h = want_flat.get(key), have_flat.get(key)
    if w != h:
      where = jax.tree_util.keystr(key)
      raise ValueError(f"{name} with widths {list(model.widths)} has {where} of shape {w}, but the model's state holds "
                       f"{h}; its parameters and width list disagree (rebuild the model with the pruned widths: "
                       "models.checkpoint.build_with_state(name, result.widths, num_classes, result.state))")


def save(model: nnx.Module, path: str | os.PathLike[str], *, force: bool = False,
         extra: Mapping[str, Any] | None = None, factory: FactorySpec | None = None) -> Path:
  """Saves ``model``'s pure state dict and its meta (how to rebuild it) as an orbax checkpoint.

  Args:
    model: a registry model, or (with ``factory``) a model built by a user's factory, dense or thinned by a plan.
    path: the checkpoint directory (created; made absolute).
    force: overwrite an existing directory.
    extra: more JSON-serialisable entries for the meta item (e.g. a pruned model's plan); read them back with
      :func:`read_meta`. A factory model cut by :func:`hsic_jax.prune` must carry its plan here (``"plan"``, the
      plan's JSON as a dict): the loader rebuilds it by cutting the factory's model to that plan.
    factory: the factory the model came from (its path, keyword arguments and input shape); ``None`` for a zoo model.

  Returns:
    The absolute checkpoint path.

  Raises:
    FileExistsError: ``path`` exists and ``force`` is false.
    ValueError: the model's parameter shapes are not those its width list builds (zoo), or not a zoo model and no
      ``factory`` given.
  """
  if factory is None:
    _check_state_matches_widths(model)
    meta = {**dict(extra or {}), "model": registry.model_name(model), "widths": model.widths,
            "num_classes": int(model.num_classes)}
  else:
    meta = {**dict(extra or {}), **factory.meta(), "widths": None,
            "num_classes": num_outputs(model, factory.example())}
  path = Path(path).resolve()
  if path.exists() and not force:
    raise FileExistsError(f"checkpoint directory {path} already exists; pass force=True (CLI: --force) to overwrite")
  # Host (NumPy) copies: with several processes orbax writes a NumPy array once, from process 0, where every
  # process's own device copy would be written by each of them into the same files.
  pure = jax.device_get(nnx.to_pure_dict(nnx.state(model)))
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(path, ocp.args.Composite(state=ocp.args.StandardSave(pure), meta=ocp.args.JsonSave(meta)),
               force=force)
  return path


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
  """The meta item of a checkpoint written by :func:`save` (``model``, ``widths``, ``num_classes`` and any
  ``extra`` entries).

  Raises:
    FileNotFoundError: ``path`` does not exist.
    ValueError: ``path`` is not such a checkpoint or cannot be read.
  """
  path = Path(path).resolve()
  if not path.exists():
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  try:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
      meta = ckptr.restore(path, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as e:  # noqa: BLE001 - orbax raises many kinds; all mean "not a readable checkpoint"
    raise ValueError(f"{path} is not a readable model checkpoint ({type(e).__name__}: {e}); expected a directory "
                     "written by models.checkpoint.save") from e
  if not isinstance(meta, dict) or not set(META_KEYS) <= set(meta):
    raise ValueError(f"{path} has no model meta (model, widths, num_classes); expected a directory written by "
                     "models.checkpoint.save")
  return meta


def skeleton_of(meta: Mapping[str, Any]) -> tuple[Any, nnx.State, str]:
  """``(graphdef, state, description)`` of the model a checkpoint's meta describes, its state's arrays placeholders
  of the right shapes: a zoo model built abstractly at its widths, or a factory's model (zeros, built abstractly)
  cut to the meta's plan by :func:`hsic_jax.thin_model` on groups derived from the factory's model.

  Raises:
    ValueError: an unknown zoo name, a factory that cannot be imported or built, a plan that does not fit it.
  """
  name, widths, num_classes = meta["model"], meta["widths"], meta["num_classes"]
  if not is_factory(name):
    graphdef, state = _skeleton(name, _key(widths), num_classes)
    return graphdef, state, f"{name} with widths {widths}"
  import hsic_jax as hj  # pylint: disable=import-outside-toplevel  (the library only for factory models)
  spec = FactorySpec.from_meta(meta)
  model = spec.build_zeros(num_classes=int(num_classes))
  what = f"{name} (kwargs {dict(spec.kwargs)})"
  if meta.get("plan"):
    x = spec.example()
    plan = hj.PrunePlan.from_json(json.dumps(meta["plan"]))
    model = hj.thin_model(model, hj.derive_model_groups(model, x), plan, x)
    what += " cut to its plan"
  graphdef, state = nnx.split(model)
  return graphdef, state, what


def load(path: str | os.PathLike[str]) -> nnx.Module:
  """Rebuilds the model saved by :func:`save` (in eval mode): a zoo model with the widths its meta records, a
  factory's model from its factory, cut to the meta's plan where it has one.

  Raises:
    FileNotFoundError: ``path`` does not exist.
    ValueError: ``path`` is not a readable checkpoint, or its arrays do not have the shapes its meta builds (a
      corrupt or hand-edited checkpoint); nothing is partially restored.
  """
  path = Path(path).resolve()
  meta = read_meta(path)
  graphdef, skeleton, what = skeleton_of(meta)
  target = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(skeleton))
  try:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
      restored = ckptr.restore(path, ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
  except Exception as e:  # noqa: BLE001
    raise ValueError(f"checkpoint {path} does not hold the state of {what} ({type(e).__name__}: {e})") from e
  try:
    return _filled(graphdef, skeleton, restored, what)
  except ValueError as e:
    raise ValueError(f"checkpoint {path} holds arrays whose shapes differ from {what}; the checkpoint is corrupt "
                     f"({e})") from e
