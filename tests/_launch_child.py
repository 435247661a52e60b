"""A stand-in program for the launcher's own tests (no JAX): prints a line, then process ``--fail`` exits with code
3 after a moment while the others sleep until they are stopped."""

import sys
import time


def main(argv: list[str]) -> int:
  args = dict(a[2:].split("=", 1) for a in argv[1:] if a.startswith("--") and "=" in a)
  pid = int(args["process_id"])
  print(f"hello from {pid} of {args['num_processes']} at {args['coordinator_address']}", flush=True)
  print("partial line without newline", end="", flush=True)
  if pid == int(args.get("fail", -1)):
    time.sleep(0.5)
    return 3
  time.sleep(600 if "fail" in args else 0)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
