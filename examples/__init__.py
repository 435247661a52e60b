"""Examples of the library used on its own (outside the pruning program)."""
