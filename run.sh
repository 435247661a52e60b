#!/usr/bin/env bash
# One entry point that sets itself up on a fresh machine:
#   bash run.sh main [ARGS...]   run the main job: the pruning program on its embedded default (digits_apib);
#                                ARGS override it, e.g. --config=resnet56_apib
#   bash run.sh test [ARGS...]   run the test suite (what CI runs)
#   bash run.sh bench NAME       run a benchmark program (benchmarks/NAME.py)
# The first call creates .venv and installs the pinned dependencies; later calls reuse it (reinstalling only
# when setup.cfg changes).
set -euo pipefail
cd "$(dirname "$0")"
cmd="${1:-}"
shift || true

case "$cmd" in
  main) extras="bench" ;;
  test) extras="test" ;;
  bench) extras="bench" ;;
  *) echo "usage: bash run.sh {main|test|bench NAME} [ARGS...]" >&2; exit 2 ;;
esac

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
stamp=".venv/.installed-$extras-$(sha1sum setup.cfg pyproject.toml | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "installing hsic-jax with extras [$extras] into .venv ..." >&2
  .venv/bin/python -m pip install --quiet -e ".[$extras]"
  touch "$stamp"
fi

export PYTHONUNBUFFERED=1
case "$cmd" in
  main)
    case " $* " in
      *" --config="*|*" --config "*) exec .venv/bin/python -m train.main "$@" ;;
      *) exec .venv/bin/python -m train.main --config=digits_apib "$@" ;;
    esac ;;
  test) exec .venv/bin/python -m pytest "$@" ;;
  bench)
    name="${1:?usage: bash run.sh bench NAME [ARGS...]}"
    shift
    exec .venv/bin/python -m "benchmarks.$name" "$@" ;;
esac
