"""Orbax checkpoints of training runs, checked against the run before anything is restored.

Every process of a multi-process run calls :meth:`TrainCheckpoints.save` and :meth:`TrainCheckpoints.restore_latest`
together (orbax's saves are collective: each array is written once, by the process holding its first replica).

A training directory holds orbax's numbered step directories, each with two items: ``state`` (the
:class:`train.train.TrainState` pytree) and ``meta`` (JSON: the widths the state was built with, the seed, the total
steps and the history so far). Saving is orbax's: a step appears only once fully written, so a run killed during a
save leaves the previous step as the latest. Before restoring, ``meta`` is compared with the run asking for it: a
checkpoint of other widths, another seed or another schedule is refused with an error that says what differs,
never partially restored; an unreadable one is refused with the path to delete.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
  """A checkpoint that belongs to another model or run, or that cannot be read."""


def _abstract(tree: Any) -> Any:
  """Shapes, dtypes and shardings of ``tree``: orbax restores each array in its template's sharding, which with
  several processes must be a global one (the mesh's), not one device of the process that wrote it."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)), tree)


class TrainCheckpoints:
  """The last ``keep`` checkpoints of one training run in ``directory``."""

  def __init__(self, directory: str | Path, *, keep: int = 2):
    self.directory = Path(directory).resolve()
    options = ocp.CheckpointManagerOptions(max_to_keep=max(1, int(keep)), create=True,
                                           enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave({**meta, "step": int(step)})))
    self._manager.wait_until_finished()

  def restore_latest(self, template: Any, expected: dict[str, Any]) -> tuple[Any, dict[str, Any]] | None:
    """The latest ``(state, meta)``, restored into ``template``'s structure and shapes; ``None`` when there is none.

    Raises:
      CheckpointMismatchError: the checkpoint's meta differs from ``expected`` on a shared key, its arrays do not
        have ``template``'s shapes, or it cannot be read.
    """
    step = self.latest_step()
    if step is None:
      return None
    where = self.directory / str(step)
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as err:  # noqa: BLE001 - orbax raises many kinds; all mean "unreadable"
      raise CheckpointMismatchError(f"checkpoint {where} cannot be read ({type(err).__name__}: {err}); delete "
                                    f"{self.directory} to start this stage again") from err
    diffs = {k: (meta.get(k), v) for k, v in expected.items() if k in meta and meta.get(k) != v}
    if diffs:
      said = "; ".join(f"{k}: checkpoint {a!r}, this run {b!r}" for k, (a, b) in diffs.items())
      raise CheckpointMismatchError(f"checkpoint {where} belongs to another run ({said}); use another --workdir or "
                                    f"delete {self.directory} to start this stage again")
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(template))))["state"]
    except Exception as err:  # noqa: BLE001
      raise CheckpointMismatchError(f"checkpoint {where} does not match this model ({type(err).__name__}: {err}); "
                                    f"delete {self.directory} to start this stage again") from err
    check_same_shapes(template, restored, where)
    return restored, meta

  def close(self) -> None:
    self._manager.close()


def check_same_shapes(template: Any, restored: Any, where: Any) -> None:
  """Raises :class:`CheckpointMismatchError` unless ``restored`` has ``template``'s tree structure and shapes."""
  want = jax.tree_util.tree_flatten_with_path(template)[0]
  have = jax.tree_util.tree_flatten_with_path(restored)[0]
  if len(want) != len(have):
    raise CheckpointMismatchError(f"checkpoint {where} holds {len(have)} arrays, this model {len(want)}")
  for (kp, a), (_, b) in zip(want, have):
    if tuple(a.shape) != tuple(b.shape):
      raise CheckpointMismatchError(f"checkpoint {where}: {jax.tree_util.keystr(kp)} has shape {tuple(b.shape)}, "
                                    f"this model {tuple(a.shape)}")
