"""Runs the pruning program as several JAX processes on this host's CPU, as one job.

  python -m train.launch --processes=2 --devices_per_process=2 -- --config=digits_apib --workdir=runs/d2

Every flag after ``--`` goes to each ``python -m train.main``, which also gets the coordinator's address (process 0,
on a free port of localhost unless ``--port`` names one), the process count and its own index, and the environment
``JAX_PLATFORMS=cpu`` and ``XLA_FLAGS=--xla_force_host_platform_device_count=D`` (D devices per process; the
program switches the CPU collectives to gloo, so one jitted step reduces over every process's devices). This is how
the program's multi-process paths are exercised on one machine; on a GPU cluster each host runs ``train.main`` with
the same three flags, and on a TPU slice ``--config.distributed=True`` alone.

The processes' output is streamed line by line with a ``[p0]``-style prefix (progress bars from process 0 only).
The job fails as a whole: when one process exits with a non-zero code the others are stopped (SIGTERM, then SIGKILL)
and the launcher exits non-zero, naming the process and its code; Ctrl-C (or SIGTERM) stops them all. Running the
same command again resumes the run from its workdir.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import TextIO

from absl import flags

_FLAGS = flags.FlagValues()
_PROCESSES = flags.DEFINE_integer("processes", None, "how many processes to start", lower_bound=1,
                                  flag_values=_FLAGS)
_DEVICES = flags.DEFINE_integer("devices_per_process", 1, "simulated CPU devices in each process", lower_bound=1,
                                flag_values=_FLAGS)
_PORT = flags.DEFINE_integer("port", None, "the coordinator's port on localhost (default: a free one)",
                             lower_bound=1, upper_bound=65535, flag_values=_FLAGS)

PROGRAM = "train.main"
_STOP_SECONDS = 10.0  # how long a stopped process gets to exit after SIGTERM before SIGKILL


def free_port() -> int:
  """A TCP port of localhost that nothing listens on now (the OS's pick)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return int(s.getsockname()[1])


def child_env(base: dict[str, str], *, devices_per_process: int, process_id: int) -> dict[str, str]:
  """``base`` with the CPU platform, ``devices_per_process`` host devices (replacing any device count already in
  ``XLA_FLAGS``), unbuffered output, and progress bars off except in process 0."""
  env = dict(base)
  xla = re.sub(r"--xla_force_host_platform_device_count=\S*", "", env.get("XLA_FLAGS", "")).split()
  env["XLA_FLAGS"] = " ".join([*xla, f"--xla_force_host_platform_device_count={devices_per_process}"])
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONUNBUFFERED"] = "1"
  if process_id > 0:
    env["TQDM_DISABLE"] = "1"  # one set of progress bars: the processes advance in lockstep
  return env


def child_command(program_args: Sequence[str], *, address: str, processes: int, process_id: int,
                  module: str = PROGRAM) -> list[str]:
  """The command line of process ``process_id``: ``python -m module`` with the distributed flags, then
  ``program_args``."""
  return [sys.executable, "-m", module, f"--coordinator_address={address}", f"--num_processes={processes}",
          f"--process_id={process_id}", *program_args]


def _stream(fd: int, prefix: str, out: TextIO, lock: threading.Lock) -> None:
  """Copies ``fd`` to ``out`` with ``prefix`` at the start of every line (``\\n`` or a progress bar's ``\\r``);
  only whole lines are written, so the processes' lines do not interleave mid-line."""
  pending = b""
  while True:
    chunk = os.read(fd, 65536)
    if chunk:
      pending += chunk
    cut = max(pending.rfind(b"\n"), pending.rfind(b"\r")) + 1 if chunk else len(pending)
    if cut:
      text = pending[:cut].decode(errors="replace")
      pending = pending[cut:]
      lines = re.split(r"(?<=[\r\n])", text)
      with lock:
        out.write("".join(prefix + line for line in lines if line))
        if not text.endswith(("\n", "\r")):
          out.write("\n")
        out.flush()
    if not chunk:
      os.close(fd)
      return


def _stop(procs: Sequence[subprocess.Popen]) -> None:
  """SIGTERM to every running process's group (its own workers too), then SIGKILL to whatever is still running."""
  for p in procs:
    if p.poll() is None:
      try:
        os.killpg(p.pid, signal.SIGTERM)
      except ProcessLookupError:
        pass
  for p in procs:
    try:
      p.wait(timeout=_STOP_SECONDS)
    except subprocess.TimeoutExpired:
      try:
        os.killpg(p.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      p.wait()


def _interrupt(signum: int, frame: object) -> None:
  raise KeyboardInterrupt(f"signal {signum}")


def describe_exit(code: int) -> str:
  """``"code 1"`` or ``"signal 9 (SIGKILL)"`` for a ``Popen.returncode``."""
  if code < 0:
    try:
      return f"signal {-code} ({signal.Signals(-code).name})"
    except ValueError:
      return f"signal {-code}"
  return f"code {code}"


def launch(program_args: Sequence[str], *, processes: int, devices_per_process: int = 1, port: int | None = None,
           module: str = PROGRAM, out: TextIO | None = None) -> int:
  """Runs ``processes`` copies of ``python -m module program_args`` as one ``jax.distributed`` job on localhost.

  Args:
    program_args: the program's own flags (``--config=...``, ``--workdir=...``, overrides).
    processes: how many processes.
    devices_per_process: simulated CPU devices in each.
    port: the coordinator's port (default: :func:`free_port`).
    module: the program to run.
    out: where the prefixed output goes (default: ``sys.stdout``).

  Returns:
    0 when every process exits with 0; otherwise the exit code of the first process that failed (128 + the signal
    when a signal ended it), after stopping the others; 130 after Ctrl-C.

  Raises:
    ValueError: ``processes`` or ``devices_per_process`` below 1.
  """
  if processes < 1:
    raise ValueError(f"processes={processes} must be >= 1")
  if devices_per_process < 1:
    raise ValueError(f"devices_per_process={devices_per_process} must be >= 1")
  out = sys.stdout if out is None else out
  address = f"localhost:{port or free_port()}"
  lock = threading.Lock()
  exits: queue.Queue[tuple[int, int]] = queue.Queue()
  procs: list[subprocess.Popen] = []
  threads: list[threading.Thread] = []

  def say(text: str) -> None:
    with lock:
      out.write(f"[launch] {text}\n")
      out.flush()

  main_thread = threading.current_thread() is threading.main_thread()
  previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None  # SIGTERM stops them as Ctrl-C
  try:
    for i in range(processes):
      # A session of its own: Ctrl-C reaches the launcher only, which stops every process (and its workers) itself.
      p = subprocess.Popen(child_command(program_args, address=address, processes=processes, process_id=i,
                                         module=module),
                           env=child_env(dict(os.environ), devices_per_process=devices_per_process, process_id=i),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
      procs.append(p)
      say(f"process {i}: pid {p.pid}")
      fd = os.dup(p.stdout.fileno())
      p.stdout.close()
      threads.append(threading.Thread(target=_stream, args=(fd, f"[p{i}] ", out, lock), daemon=True))
      threads[-1].start()
      threading.Thread(target=lambda i=i, p=p: exits.put((i, p.wait())), daemon=True).start()
    remaining = set(range(processes))
    while remaining:
      try:
        i, code = exits.get(timeout=0.5)  # a timeout keeps Ctrl-C deliverable to this thread
      except queue.Empty:
        continue
      remaining.discard(i)
      if code != 0:
        _stop(procs)
        for t in threads:
          t.join(timeout=5)
        say(f"error: process {i} exited with {describe_exit(code)}; stopped the other processes")
        return code if code > 0 else 128 - code
    for t in threads:
      t.join(timeout=5)
    return 0
  except KeyboardInterrupt:
    _stop(procs)
    say("interrupted: stopped every process")
    return 130
  finally:
    if main_thread:
      signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)
  try:
    program_args = _FLAGS(argv)[1:]  # absl stops at "--" and returns what follows, after the program name
    if _PROCESSES.value is None:
      raise flags.Error("--processes is required (how many processes to start)")
  except flags.Error as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  return launch(program_args, processes=_PROCESSES.value, devices_per_process=_DEVICES.value, port=_PORT.value)


if __name__ == "__main__":
  sys.exit(main())
