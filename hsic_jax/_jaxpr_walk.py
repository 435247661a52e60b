"""The walk over a jaxpr's equations shared by channel-group derivation and the MACs counter.

Both are abstract interpreters: each jaxpr variable carries an abstract value (for channel groups, how each axis
relates to channel sets; for the MACs counter, the parameter a value was read from), and one function per
equation maps the values of its operands to those of its results. What they share is the walk itself: an
environment from variables to values, literals and unknown variables read through a default, and the inlining of
call-like primitives (``pjit``, ``closed_call``, ``custom_jvp_call``, ``custom_vjp_call``, ``checkpoint``/``remat``)
whose body jaxpr takes the equation's operands one-to-one and whose results are the body's results: calling the
body is the same as running its equations in place, so the walk enters it with the operands' values and binds the
equation's results to the body's results. Control flow (``cond``, ``while``, ``scan``) is not a call in this sense
(its bodies run zero, one or many times, and their operands do not map one-to-one); :func:`sub_jaxprs` lists its
bodies for a rule that wants to look inside.

Used by :mod:`hsic_jax.jaxpr_groups` and :mod:`hsic_jax.costs`; not part of the public API.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax.extend.core as jcore

V = TypeVar("V")

# Call-like primitives whose body is inlined (their operands map one-to-one onto its inputs).
CALL_PRIMITIVES = frozenset({"pjit", "jit", "closed_call", "core_call", "named_call", "custom_jvp_call",
                             "custom_vjp_call", "custom_vjp_call_jaxpr", "checkpoint", "remat", "remat2"})
# Parameter names under which those primitives keep their body, in the order they are tried.
_BODY_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def _as_jaxpr(value: Any) -> tuple[jcore.Jaxpr, Sequence[Any]] | None:
  if isinstance(value, jcore.ClosedJaxpr):
    return value.jaxpr, value.consts
  if isinstance(value, jcore.Jaxpr):
    return value, ()
  return None


def call_body(eqn: jcore.JaxprEqn) -> tuple[jcore.Jaxpr, Sequence[Any]] | None:
  """The body ``(jaxpr, consts)`` of a call-like equation that can be inlined, else ``None``.

  A body is inlined only when it has as many inputs and outputs as the equation has operands and results.
  """
  if eqn.primitive.name not in CALL_PRIMITIVES:
    return None
  for key in _BODY_PARAMS:
    body = _as_jaxpr(eqn.params.get(key))
    if body is not None and len(body[0].invars) == len(eqn.invars) and len(body[0].outvars) == len(eqn.outvars):
      return body
  return None


def sub_jaxprs(eqn: jcore.JaxprEqn) -> list[jcore.Jaxpr]:
  """Every jaxpr among an equation's parameters (call bodies, ``cond`` branches, ``scan``/``while`` bodies)."""
  subs = []
  for value in eqn.params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      body = _as_jaxpr(item)
      if body is not None:
        subs.append(body[0])
  return subs


def interpret(jaxpr: jcore.Jaxpr, consts: Sequence[V], args: Sequence[V],
              rule: Callable[[jcore.JaxprEqn, list[V]], Sequence[V]], *, default: Callable[[Any], V],
              const_value: Callable[[Any], V] | None = None,
              on_eqn: Callable[[jcore.JaxprEqn, list[V]], None] | None = None) -> list[V]:
  """Runs ``rule`` over the equations of ``jaxpr`` in order, inlining call-like equations; returns output values.

  Args:
    jaxpr: the jaxpr to walk.
    consts: values of its ``constvars``.
    args: values of its ``invars``.
    rule: ``rule(eqn, operand_values) -> result_values`` for every equation that is not inlined.
    default: value of a literal or of a variable not bound in the environment (given the variable).
    const_value: value of a constant of an inlined body (given the constant); ``default`` of ``None`` if omitted.
    on_eqn: called with every equation and its operand values before it is run or inlined (calls included).

  Returns:
    The values of ``jaxpr.outvars``.
  """
  env: dict[Any, V] = {}
  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))

  def read(v: Any) -> V:
    if isinstance(v, jcore.Literal) or v not in env:
      return default(v)
    return env[v]

  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    if on_eqn is not None:
      on_eqn(eqn, ins)
    body = call_body(eqn)
    if body is not None:
      sub, sub_consts = body
      cv = const_value if const_value is not None else (lambda c: default(None))
      outs: Sequence[V] = interpret(sub, [cv(c) for c in sub_consts], ins, rule, default=default,
                                    const_value=const_value, on_eqn=on_eqn)
    else:
      outs = rule(eqn, ins)
    for v, value in zip(eqn.outvars, outs):
      if not isinstance(v, jcore.DropVar):
        env[v] = value
  return [read(v) for v in jaxpr.outvars]


def read_inputs(jaxpr: jcore.Jaxpr) -> list[bool]:
  """For each input of ``jaxpr``: whether some equation reads it (through inlined calls), not only returns it.

  An input that reaches the outputs unchanged, or is not used at all, is not read.
  """
  read: set[int] = set()

  def rule(eqn: jcore.JaxprEqn, ins: list[frozenset[int]]) -> list[frozenset[int]]:
    for s in ins:
      read.update(s)
    return [frozenset()] * len(eqn.outvars)

  interpret(jaxpr, [frozenset()] * len(jaxpr.constvars), [frozenset({i}) for i in range(len(jaxpr.invars))], rule,
            default=lambda v: frozenset(), const_value=lambda c: frozenset())
  return [i in read for i in range(len(jaxpr.invars))]
