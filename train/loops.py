"""The program's loops fed from a config's data: a training loop, evaluation, and BatchNorm re-estimation.

:mod:`train.train` holds the jitted steps and the loop over any batches; this module wires them to the data a
config names (``cfg.data``, split, seed, batch sizes, this process's share of every batch), so that the program's
stages and the benchmarks that measure them train and evaluate the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections
from flax import nnx

from train import data, train as train_lib


def _shard() -> dict[str, int]:
  return {"process_index": jax.process_index(), "process_count": jax.process_count()}


def _on_device(cfg: ml_collections.ConfigDict, batches: Iterator[train_lib.Batch],
               mesh: jax.sharding.Mesh) -> Iterator[dict[str, jax.Array]]:
  return train_lib.device_batches(batches, mesh, mean=cfg.data.mean, std=cfg.data.std)


def make_loop(cfg: ml_collections.ConfigDict, section: ml_collections.ConfigDict, workdir: str | Path, *,
              mesh: jax.sharding.Mesh, desc: str, log: Callable[[dict[str, Any]], None] | None = None,
              evaluate: bool = True, steps_per_epoch: int | None = None) -> train_lib.Loop:
  """The :class:`train.train.Loop` of a training run with recipe ``section`` (``cfg.pretrain``, ``cfg.finetune``)
  on ``cfg.data``: seeded training batches of ``section.batch_size`` from any step, evaluation on
  ``cfg.data.eval_split`` at ``cfg.eval.batch_size``, both placed on ``mesh`` and normalised there
  (:func:`train.train.device_batches`).

  Args:
    cfg: the run's config (its ``data``, ``eval`` and ``seed``).
    section: the recipe (its ``batch_size``).
    workdir: where the run's checkpoints go.
    mesh: the mesh the batches are placed on (the one the loop trains on).
    desc: the name of the run in progress bars and logs.
    log: receives each logged record (default: dropped).
    evaluate: evaluate after every ``section.eval_every_epochs`` epochs (false: never).
    steps_per_epoch: steps per "epoch" (the schedule's unit); default: one pass over the training split.
  """
  bs = int(section.batch_size)
  eval_bs = int(cfg.eval.batch_size)
  shard = _shard()
  n_eval = data.num_examples(cfg.data, cfg.data.eval_split)
  return train_lib.Loop(
      train_batches=lambda start: _on_device(cfg, data.train_batches(cfg.data, batch_size=bs, seed=int(cfg.seed),
                                                                     start_step=start, **shard), mesh),
      eval_batches=(lambda: _on_device(cfg, data.eval_batches(cfg.data, cfg.data.eval_split, batch_size=eval_bs,
                                                              **shard), mesh))
      if evaluate else None,
      steps_per_epoch=data.steps_per_epoch(cfg.data, batch_size=bs) if steps_per_epoch is None else steps_per_epoch,
      eval_steps=-(-n_eval // eval_bs) if evaluate else None,
      workdir=Path(workdir), log=log or (lambda record: None), desc=desc)


def evaluate_model(cfg: ml_collections.ConfigDict, model: nnx.Module, mesh: jax.sharding.Mesh, *,
                   split: str | None = None, desc: str = "eval") -> dict[str, float]:
  """Top-1, top-5 and mean loss of ``model`` (eval mode) on every example of ``split`` (default
  ``cfg.data.eval_split``), in batches of ``cfg.eval.batch_size`` (:func:`train.train.evaluate`).

  Raises:
    ValueError: a batch size that does not split over the mesh's devices, or an empty split.
  """
  split = cfg.data.eval_split if split is None else split
  bs = int(cfg.eval.batch_size)
  train_lib.check_batch_size(bs, mesh, "eval")
  n = data.num_examples(cfg.data, split)
  batches = _on_device(cfg, data.eval_batches(cfg.data, split, batch_size=bs, **_shard()), mesh)
  return train_lib.evaluate(model, batches, mesh, desc=desc, total=-(-n // bs))


def recalibrated(cfg: ml_collections.ConfigDict, model: nnx.Module, mesh: jax.sharding.Mesh, *,
                 batch_size: int | None = None) -> nnx.Module:
  """``model`` with its BatchNorm statistics re-estimated (:func:`train.train.recalibrate_batch_norm`) on
  ``cfg.eval.bn_recalibrate_steps`` training batches of ``batch_size`` (default ``cfg.finetune.batch_size``),
  drawn with seed ``cfg.seed + 1`` (another order than training's)."""
  bs = int(cfg.finetune.batch_size) if batch_size is None else int(batch_size)
  batches = _on_device(cfg, data.train_batches(cfg.data, batch_size=bs, seed=int(cfg.seed) + 1, **_shard()), mesh)
  return train_lib.recalibrate_batch_norm(model, batches, int(cfg.eval.bn_recalibrate_steps), mesh)
