"""The pruning program's entry point: flags, host set-up, one call to :func:`train.pipeline.run_pipeline`.

  python -m train.main --config=resnet56_apib [--config.finetune.epochs=2] [--workdir=runs/r56] [--only=select]

``--config`` takes a bare name (a file of ``train/configs/``) or a path; ``--config.a.b=value`` overrides a field.
``--workdir`` defaults to ``runs/NAME``; running the same command again resumes where it stopped.

Many processes: ``--config.distributed=True`` calls ``jax.distributed.initialize()`` with no arguments (a TPU slice
or a cluster manager supplies them); on a cluster without one, give every process ``--coordinator_address``,
``--num_processes`` and its ``--process_id`` (what ``python -m train.launch`` passes its children on one host).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from absl import flags
from ml_collections import config_flags

from train import config_lib

# Flags of their own (not absl's global FLAGS): the program and train.evaluate can live in one process.
_FLAGS = flags.FlagValues()

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config: a name in train/configs/ or a path",
                                          lock_config=True, flag_values=_FLAGS)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (default: runs/<config name>)",
                                flag_values=_FLAGS)
_CACHE = flags.DEFINE_string("compilation_cache", "~/.cache/hsic_jax/jax",
                             "JAX's persistent compilation cache directory ('' to turn it off): a run started again "
                             "does not compile again", flag_values=_FLAGS)
_ONLY = flags.DEFINE_enum("only", None,
                          ["dense", "calibrate", "select", "surgery", "finetune", "evaluate", "report"],
                          "run only this stage, from the previous stage's saved result", flag_values=_FLAGS)
# Flags, not config fields: they differ between the processes of one run and between a run and its resumption,
# and the workdir's config.json must stay the same for all of them.
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0's coordinator (several processes without a cluster "
                                   "manager; with --num_processes and --process_id)", flag_values=_FLAGS)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "how many processes the run has", lower_bound=1,
                                      flag_values=_FLAGS)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index in [0, num_processes)",
                                   lower_bound=0, flag_values=_FLAGS)


def _initialize_distributed(distributed: bool) -> str | None:
  """Starts ``jax.distributed`` from the flags, or with no arguments when ``distributed``; returns what is wrong
  with the flags, if anything."""
  import jax  # pylint: disable=import-outside-toplevel
  given = {"coordinator_address": _COORDINATOR.value, "num_processes": _NUM_PROCESSES.value,
           "process_id": _PROCESS_ID.value}
  if not any(v is not None for v in given.values()):
    if distributed:
      jax.distributed.initialize()
    return None
  missing = [k for k, v in given.items() if v is None]
  if missing:
    return f"--{', --'.join(missing)} missing: --coordinator_address, --num_processes and --process_id go together"
  if given["process_id"] >= given["num_processes"]:
    return f"--process_id={given['process_id']} must be in [0, --num_processes={given['num_processes']})"
  # The CPU backend's cross-process collectives (one jit reducing over every process's devices); GPUs and TPUs use
  # their own, and this setting does not touch them.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**given)
  return None


def main(argv: Sequence[str] | None = None) -> int:
  parsed = config_lib.parse_flags(sys.argv if argv is None else argv, _FLAGS, _CONFIG)
  if parsed is None:
    return 2
  config, name = parsed
  # Host set-up before JAX starts any work: multi-host runs, and SciPy's LAPACK threads on the CPU backend.
  import jax  # pylint: disable=import-outside-toplevel
  if _CACHE.value and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(_CACHE.value))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  err = _initialize_distributed(bool(config.distributed))
  if err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  if jax.default_backend() == "cpu":
    import hsic_jax  # pylint: disable=import-outside-toplevel
    hsic_jax.limit_lapack_threads()
  from train import pipeline  # pylint: disable=import-outside-toplevel
  workdir = _WORKDIR.value or os.path.join("runs", name)
  try:
    report = pipeline.run_pipeline(config, workdir, only=_ONLY.value)
  except (ValueError, FileNotFoundError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 1
  if report and jax.process_index() == 0:
    p, d = report["pruned"], report["dense"]
    print(f"\n{report['model']}: {d['macs'] / 1e6:.2f}M -> {p['macs'] / 1e6:.2f}M MACs "
          f"({report['ratios']['macs']:.1%}), {d['params'] / 1e6:.3f}M -> {p['params'] / 1e6:.3f}M params; "
          f"top-1 dense {d['top1']:.4f}, pruned {p['top1_before_finetune']:.4f} after surgery, "
          f"{p['top1']:.4f} fine-tuned")
    for warning in report.get("warnings") or []:
      print(f"warning: {warning}")
    print(f"report: {os.path.join(os.path.abspath(workdir), 'report.md')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
