"""Training and evaluation: the loop shared by pre-training and fine-tuning, under ``jax.jit`` with shardings.

The model is split once into a graph definition and pure dicts of arrays (parameters, BatchNorm statistics), so the
train step is a pure function ``(state, batch) -> (state, metrics)`` of a :class:`TrainState`. A ``('data',)`` mesh
spans every device: the state is replicated, batches are split along their first axis, and XLA's partitioner makes
the BatchNorm statistics and the gradient global (no pmap, no explicit all-reduce). The same code runs on one CPU,
8 simulated CPU devices, a GPU or a TPU slice; with several processes each feeds its own part of the global batch.

Recipe (the config's ``pretrain`` / ``finetune`` section): SGD with momentum (optionally Nesterov), a per-step
cosine schedule to 0 after an optional linear warmup, weight decay added to the gradient (optionally sparing
BatchNorm scales and biases), cross-entropy with optional label smoothing, and optional knowledge distillation from
a teacher (the dense model): ``loss = (1 - w) CE + w T^2 KL(softmax(t / T) || softmax(s / T))``.

Precision (the config's ``half_precision``, :func:`compute_dtype`): the model's convolutions and matmuls may run in
bfloat16 (:func:`models.set_compute_dtype`, part of the graph definition), while the state stays float32: the
parameters and their gradients, the optimizer's momentum, the BatchNorm statistics, and the losses, taken on float32
logits. Evaluation runs the model as it was trained.

Checkpoints (orbax): the state, the step (which is the data position: batch ``k`` of a seeded run is a function of
``k`` alone) and the run's seed, every ``checkpoint_every_steps`` and at the end, keeping the last few. A run
restarted with the same command resumes from the latest one and ends with the same parameters as a run that was
never interrupted.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from train import checkpoints

Batch = Mapping[str, np.ndarray]


class TrainState(NamedTuple):
  """Everything a training step reads and writes: pure pytrees of arrays, replicated over the mesh."""

  step: jax.Array
  params: dict[str, Any]
  batch_stats: dict[str, Any]
  opt_state: Any


@dataclasses.dataclass
class Split:
  """A model split into its (static) graph definitions and pure-dict variables."""

  train_def: Any
  eval_def: Any
  params: dict[str, Any]
  batch_stats: dict[str, Any]


def split_model(model: nnx.Module) -> Split:
  """Pure dicts of ``model``'s parameters and BatchNorm statistics, and its train- and eval-mode graphs."""
  model.train()
  train_def, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  model.eval()
  eval_def = nnx.graphdef(model)
  return Split(train_def, eval_def, nnx.to_pure_dict(params), nnx.to_pure_dict(stats))


def merge(graphdef: Any, params: Mapping[str, Any], batch_stats: Mapping[str, Any]) -> nnx.Module:
  """A model from its graph definition and pure dicts (traceable: used inside jitted steps)."""
  return nnx.merge(graphdef, nnx.State(params), nnx.State(batch_stats))


def to_model(model: nnx.Module, params: Mapping[str, Any], batch_stats: Mapping[str, Any]) -> nnx.Module:
  """``model`` with its parameters and statistics replaced by host copies of ``params`` and ``batch_stats``."""
  state = nnx.state(model)
  pure = nnx.to_pure_dict(state)
  host = jax.device_get({"p": params, "s": batch_stats})
  _merge_into(pure, host["p"])
  _merge_into(pure, host["s"])
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
  nnx.update(model, state)
  model.eval()
  return model


def _merge_into(dst: dict, src: Mapping) -> None:
  for k, v in src.items():
    if isinstance(v, Mapping):
      _merge_into(dst.setdefault(k, {}), v)
    else:
      dst[k] = v


# ------------------------------------------------------------------------------------------------------------------
# Mesh and shardings.


def make_mesh(devices: list[Any] | None = None) -> jax.sharding.Mesh:
  """A 1-D ``('data',)`` mesh over ``devices`` (default: all), with Auto axis types (sharding propagated by XLA)."""
  devices = jax.devices() if devices is None else devices
  return jax.sharding.Mesh(np.asarray(devices), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(batch: Batch, mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Places a process-local batch as the process's part of a global batch split along axis 0 over ``data``
  (arrays already placed so, as :func:`device_batches` yields them, are kept as they are)."""
  sharding = NamedSharding(mesh, P("data"))
  return {k: v if isinstance(v, jax.Array) and v.sharding == sharding
          else jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


@functools.lru_cache(maxsize=8)
def _normalizer(mean: tuple[float, ...], std: tuple[float, ...]) -> Callable[[jax.Array], jax.Array]:
  # A 256-entry table per channel, computed on the host by the host's own formula: XLA compiles the division by
  # 255 and by std to reciprocal products, about half a float32 ulp away on most pixels, and those differences,
  # carried through a training run, changed the embedded default's selected widths. The table makes the device's
  # images bit-identical to the host's (calibration) ones, for the price of one gather.
  from models.cifar10 import normalize  # pylint: disable=import-outside-toplevel
  table = jnp.asarray(normalize(np.tile(np.arange(256, dtype=np.uint8)[:, None], (1, len(mean))), mean, std))
  channels = jnp.arange(len(mean))
  return jax.jit(lambda x: table[x.astype(jnp.int32), channels])


def device_batches(batches: Iterator[Batch], mesh: jax.sharding.Mesh, *, mean: Sequence[float],
                   std: Sequence[float], prefetch: int = 2) -> Iterator[dict[str, jax.Array]]:
  """Host batches of uint8 images placed on the mesh (:func:`shard_batch`) and normalised there,
  ``image = (x / 255 - mean) / std`` in float32, ``prefetch`` batches ahead of the one yielded.

  Transfers and the jitted normalisation are dispatched asynchronously, so while the step consumes batch ``k``,
  batches ``k + 1 ... k + prefetch`` are already on their way: the step waits on the host only when the host is
  slower than the step. Closing this iterator closes ``batches`` (stopping grain's workers).
  """
  if prefetch < 0:
    raise ValueError(f"prefetch={prefetch} must be >= 0")
  normalize = _normalizer(tuple(float(m) for m in mean), tuple(float(s) for s in std))
  queue: collections.deque[dict[str, jax.Array]] = collections.deque()
  try:
    for batch in batches:
      if np.dtype(batch["image"].dtype) != np.uint8:
        raise ValueError(f"device_batches: batch['image'] is {batch['image'].dtype}; expected the data layer's uint8 "
                         "pixels (it normalises them)")
      placed = shard_batch(batch, mesh)
      placed["image"] = normalize(placed["image"])
      queue.append(placed)
      if len(queue) > prefetch:
        yield queue.popleft()
    while queue:
      yield queue.popleft()
  finally:
    close = getattr(batches, "close", None)
    if close is not None:
      close()


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh, what: str) -> None:
  """Raises ValueError unless the global ``batch_size`` splits evenly over the mesh's devices (so over its
  processes too: each feeds the rows of its own devices)."""
  n = mesh.devices.size
  if batch_size % n:
    processes = len({d.process_index for d in mesh.devices.flat})
    over = f" ({processes} processes x {n // processes})" if processes > 1 else ""
    raise ValueError(f"{what} batch_size {batch_size} must be a multiple of the {n} devices it is split over"
                     f"{over}; expected e.g. {max(n, batch_size // n * n)}")


# ------------------------------------------------------------------------------------------------------------------
# Precision.


def compute_dtype(half_precision: Any) -> Any:
  """The convolutions' and matmuls' dtype for the config's ``half_precision``: ``jnp.bfloat16`` for True, ``None``
  (float32) for False, and for ``"auto"`` bfloat16 on a GPU or TPU and float32 on a CPU (which emulates bfloat16
  products at a loss). Call it after the host set-up (``jax.distributed.initialize``): "auto" asks for the backend.

  Raises:
    ValueError: any other value.
  """
  if isinstance(half_precision, str) and half_precision.lower() == "auto":
    return None if jax.default_backend() == "cpu" else jnp.bfloat16
  if isinstance(half_precision, (bool, np.bool_)):
    return jnp.bfloat16 if half_precision else None
  raise ValueError(f"half_precision must be True, False or 'auto', got {half_precision!r}")


def precision_name(dtype: Any) -> str:
  """``"bfloat16"`` or ``"float32"``: what a run records of :func:`compute_dtype`'s result."""
  return "float32" if dtype is None else jnp.dtype(dtype).name


def float32_logits(logits: jax.Array) -> jax.Array:
  """Logits (in the model's compute dtype) as float32: every loss and softmax is taken in float32, whatever the
  precision of the convolutions, as bfloat16's 8-bit mantissa would round the log-probabilities."""
  return jnp.asarray(logits, jnp.float32)


# ------------------------------------------------------------------------------------------------------------------
# Recipe.


def create_learning_rate_fn(cfg: Any, steps_per_epoch: int) -> optax.Schedule:
  """Linear warmup over ``warmup_epochs`` from 0 to ``lr``, then a cosine decay to 0 at the last step."""
  total = max(1, int(cfg.epochs * steps_per_epoch))
  warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
  cosine = optax.cosine_decay_schedule(cfg.lr, max(1, total - warmup))
  if warmup <= 0:
    return cosine
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), cosine], [warmup])


def decay_mask(params: Mapping[str, Any], decay_bn_and_bias: bool) -> Any:
  """True for the parameters weight decay applies to: every one, or all but biases and BatchNorm scales."""
  def rule(path, _):
    name = str(getattr(path[-1], "key", path[-1]))
    return decay_bn_and_bias or name not in ("bias", "scale")
  return jax.tree_util.tree_map_with_path(rule, params)


def create_optimizer(cfg: Any, lr_fn: optax.Schedule, params: Mapping[str, Any]) -> optax.GradientTransformation:
  """Weight decay added to the gradient (PyTorch's SGD convention), then SGD with momentum."""
  return optax.chain(
      optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask(params, cfg.decay_bn_and_bias)),
      optax.sgd(lr_fn, momentum=cfg.momentum, nesterov=cfg.nesterov),
  )


def cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float) -> jax.Array:
  """Per-example cross-entropy (with label smoothing ``smoothing``), in float32."""
  logits = float32_logits(logits)
  num_classes = logits.shape[-1]
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing) if smoothing else \
      jax.nn.one_hot(labels, num_classes)
  return optax.softmax_cross_entropy(logits, targets)


def distillation(student: jax.Array, teacher: jax.Array, temperature: float) -> jax.Array:
  """``T^2 KL(softmax(t / T) || softmax(s / T))`` per example (Hinton et al.: T^2 keeps gradient scales)."""
  t = jax.nn.log_softmax(float32_logits(teacher) / temperature)
  s = jax.nn.log_softmax(float32_logits(student) / temperature)
  return temperature ** 2 * jnp.sum(jnp.exp(t) * (t - s), axis=-1)


def make_train_step(split: Split, tx: optax.GradientTransformation, cfg: Any, lr_fn: optax.Schedule,
                    teacher: Split | None = None) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """The jitted step ``(state, batch, teacher_vars) -> (state, metrics)``; ``teacher_vars`` is ``None`` without
  distillation."""
  weight = float(cfg.distill_weight) if teacher is not None else 0.0

  def step(state: TrainState, batch: dict[str, jax.Array], teacher_vars: Any):
    def loss_fn(params):
      model = merge(split.train_def, params, state.batch_stats)
      logits = float32_logits(model(batch["image"]))
      loss = cross_entropy(logits, batch["label"], cfg.label_smoothing)
      if weight:
        t_model = merge(teacher.eval_def, *teacher_vars)
        t_logits = jax.lax.stop_gradient(t_model(batch["image"]))
        loss = (1.0 - weight) * loss + weight * distillation(logits, t_logits, cfg.distill_temperature)
      return jnp.mean(loss), (logits, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))

    (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
               "lr": lr_fn(state.step)}
    return TrainState(state.step + 1, params, stats, opt_state), metrics

  return jax.jit(step, donate_argnums=(0,))


@functools.lru_cache(maxsize=16)
def make_eval_step(graphdef: Any) -> Callable[..., dict[str, jax.Array]]:
  """The jitted ``(params, batch_stats, batch) -> sums`` of correct top-1 / top-5 predictions, loss and examples
  over the unmasked (real) examples of a padded batch."""

  def step(params, batch_stats, batch):
    logits = float32_logits(merge(graphdef, params, batch_stats)(batch["image"]))
    mask = batch["mask"].astype(jnp.float32)
    labels = batch["label"]
    k = min(5, logits.shape[-1])
    top = jax.lax.top_k(logits, k)[1]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {"top1": jnp.sum((top[:, 0] == labels) * mask), "top5": jnp.sum(jnp.any(top == labels[:, None], -1) * mask),
            "loss": jnp.sum(loss * mask), "count": jnp.sum(mask)}

  return jax.jit(step)


def evaluate(model: nnx.Module, batches: Iterator[Batch], mesh: jax.sharding.Mesh, *, desc: str = "eval",
             total: int | None = None) -> dict[str, float]:
  """Top-1, top-5 and mean loss of ``model`` (eval mode: running BatchNorm statistics) over every example."""
  split = split_model(model)
  params, stats = replicate((split.params, split.batch_stats), mesh)
  step = make_eval_step(split.eval_def)
  sums = None
  for batch in tqdm(batches, desc=desc, total=total, unit="batch", leave=False):
    out = step(params, stats, shard_batch(batch, mesh))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  if sums is None:
    raise ValueError("the evaluation split holds no examples")
  sums = jax.device_get(sums)
  n = float(sums["count"])
  return {"top1": float(sums["top1"]) / n, "top5": float(sums["top5"]) / n, "loss": float(sums["loss"]) / n,
          "examples": int(n)}


def recalibrate_batch_norm(model: nnx.Module, batches: Iterator[Batch], steps: int, mesh: jax.sharding.Mesh
                           ) -> nnx.Module:
  """Replaces every BatchNorm's running statistics by the mean of its batch statistics over ``steps`` batches.

  A train-mode forward updates ``running <- m running + (1 - m) batch`` (``m = 0.9``), so each batch's statistics
  are ``(new - m old) / (1 - m)``; they are averaged (the layers' inputs come from batch-statistics normalisation
  upstream, as in training), which decides a pruned model's accuracy before fine-tuning.
  """
  split = split_model(model)
  params, stats = replicate((split.params, split.batch_stats), mesh)
  momentum = _bn_momentum(model)

  @jax.jit
  def batch_stats_of(params, stats, images):
    m = merge(split.train_def, params, stats)
    m(images)
    new = nnx.to_pure_dict(nnx.state(m, nnx.BatchStat))
    return jax.tree.map(lambda n, o: (n - momentum * o) / (1.0 - momentum), new, stats)

  total, count = None, 0
  for batch, _ in zip(batches, range(steps)):
    images = shard_batch({"image": batch["image"]}, mesh)["image"]
    got = batch_stats_of(params, stats, images)
    total = got if total is None else jax.tree.map(jnp.add, total, got)
    count += 1
  if count == 0:
    raise ValueError("no training batches to re-estimate BatchNorm statistics from")
  mean = jax.tree.map(lambda t: t / count, total)
  return to_model(model, split.params, mean)


def _bn_momentum(model: nnx.Module) -> float:
  moms = {float(m.momentum) for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)}
  if len(moms) != 1:
    raise ValueError(f"expected one BatchNorm momentum in the model, found {sorted(moms)}")
  return moms.pop()


# ------------------------------------------------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass
class Loop:
  """What :func:`train_and_evaluate` needs besides the model: data and where to write."""

  train_batches: Callable[[int], Iterator[Batch]]   # start_step -> iterator of process-local batches
  eval_batches: Callable[[], Iterator[Batch]] | None
  steps_per_epoch: int
  eval_steps: int | None
  workdir: Path
  log: Callable[[dict[str, Any]], None]
  desc: str = "train"


def init_state(split: Split, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(jnp.zeros((), jnp.int32), split.params, split.batch_stats, tx.init(split.params))


def train_and_evaluate(model: nnx.Module, cfg: Any, loop: Loop, mesh: jax.sharding.Mesh, *, seed: int,
                       teacher: nnx.Module | None = None) -> tuple[nnx.Module, list[dict[str, Any]]]:
  """Trains ``model`` with recipe ``cfg`` for ``cfg.epochs`` epochs, resuming from ``loop.workdir``'s latest
  checkpoint; returns the trained model (eval mode) and the per-epoch history.

  Raises:
    ValueError: a batch size that does not split over the devices, or a checkpoint of another model.
  """
  check_batch_size(cfg.batch_size, mesh, loop.desc)
  split = split_model(model)
  lr_fn = create_learning_rate_fn(cfg, loop.steps_per_epoch)
  tx = create_optimizer(cfg, lr_fn, split.params)
  total = int(cfg.epochs * loop.steps_per_epoch)
  manager = checkpoints.TrainCheckpoints(loop.workdir, keep=cfg.keep_checkpoints)
  # Replicated before restoring: the checkpoint is read straight into the mesh's layout (on every process).
  state = replicate(init_state(split, tx), mesh)
  meta = {"widths": list(getattr(model, "widths", ())), "seed": int(seed), "total_steps": total}
  restored = manager.restore_latest(state, meta)
  history: list[dict[str, Any]] = []
  if restored is not None:
    state, saved = restored
    history = list(saved.get("history", []))
  teacher_split = split_model(teacher) if teacher is not None and cfg.distill_weight > 0 else None
  teacher_vars = None if teacher_split is None else replicate((teacher_split.params, teacher_split.batch_stats), mesh)
  step_fn = make_train_step(split, tx, cfg, lr_fn, teacher_split)
  start = int(jax.device_get(state.step))
  every = max(1, int(cfg.checkpoint_every_steps))
  eval_every = max(1, int(cfg.eval_every_epochs)) * loop.steps_per_epoch
  batches = loop.train_batches(start)
  window: list[dict[str, jax.Array]] = []
  t_epoch = time.perf_counter()
  bar = None
  for step in range(start, total):
    epoch = step // loop.steps_per_epoch
    if bar is None or step % loop.steps_per_epoch == 0:
      if bar is not None:
        bar.close()
      done_in_epoch = step % loop.steps_per_epoch
      bar = tqdm(total=loop.steps_per_epoch, initial=done_in_epoch, desc=f"{loop.desc} epoch {epoch + 1}/"
                 f"{math.ceil(total / loop.steps_per_epoch)}", unit="step", leave=False)
    state, metrics = step_fn(state, shard_batch(next(batches), mesh), teacher_vars)
    window.append(metrics)
    bar.update(1)
    done = step + 1
    if done % max(1, int(cfg.log_every_steps)) == 0 or done % loop.steps_per_epoch == 0 or done == total:
      avg = {k: float(np.mean([float(m[k]) for m in window])) for k in window[0]}
      window = []
      bar.set_postfix(loss=f"{avg['loss']:.3f}", acc=f"{avg['accuracy']:.3f}")
      loop.log({"stage": loop.desc, "step": done, "epoch": done / loop.steps_per_epoch, **avg})
      last_train = avg
    if done % eval_every == 0 or done == total:
      record = {"epoch": done / loop.steps_per_epoch, "step": done, "train_loss": last_train["loss"],
                "train_accuracy": last_train["accuracy"], "seconds": time.perf_counter() - t_epoch}
      if loop.eval_batches is not None:
        trained = to_model(model, state.params, state.batch_stats)
        record.update({f"eval_{k}": v for k, v in evaluate(trained, loop.eval_batches(), mesh,
                                                           total=loop.eval_steps).items()})
      history.append(record)
      loop.log({"stage": loop.desc, "event": "epoch", **record})
      tqdm.write(f"{loop.desc} epoch {record['epoch']:.0f}: loss {record['train_loss']:.4f}, train acc "
                 f"{record['train_accuracy']:.4f}" + (f", eval top-1 {record['eval_top1']:.4f}"
                                                      if "eval_top1" in record else "")
                 + f" ({record['seconds']:.1f} s)")
      t_epoch = time.perf_counter()
    if done % every == 0 or done == total:
      manager.save(done, state, {**meta, "history": history})
  if bar is not None:
    bar.close()
  manager.close()
  return to_model(model, state.params, state.batch_stats), history
