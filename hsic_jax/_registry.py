"""A registry of named entries (criteria, selection methods): adding, replacing, removing and looking them up, with
one set of errors."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
  """Entries by name, in registration order; ``kind`` names them in errors (``"criterion"``, ``"selection method"``).

  >>> r = Registry("colour")
  >>> r.add("red", 1)
  >>> r.names(), r.get("red")
  (('red',), 1)
  """

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: dict[str, T] = {}

  def add(self, name: Any, entry: T, *, replace: bool = False) -> None:
    """Registers ``entry`` as ``name``.

    Raises:
      ValueError: ``name`` is not a non-empty string, or is taken and not ``replace``.
    """
    if not isinstance(name, str) or not name:
      raise ValueError(f"name must be a non-empty string, got {name!r}")
    if name in self._entries and not replace:
      raise ValueError(f"{self.kind} {name!r} is already registered; pass replace=True to replace it")
    self._entries[name] = entry

  def get(self, name: Any) -> T:
    """The entry ``name``.

    Raises:
      ValueError: an unknown name (the message lists the known ones).
    """
    if not isinstance(name, str) or name not in self._entries:
      raise ValueError(f"unknown {self.kind} {name!r}; expected one of {list(self._entries)}")
    return self._entries[name]

  def remove(self, name: Any) -> None:
    """Removes ``name`` (ValueError for an unknown one, as :meth:`get`)."""
    self.get(name)
    del self._entries[name]

  def names(self) -> tuple[str, ...]:
    return tuple(self._entries)

  def values(self) -> tuple[T, ...]:
    return tuple(self._entries.values())
