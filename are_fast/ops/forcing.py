"""A choice the library makes by itself (a precision, a path) that a test or the environment can force.

``Forcing(name, env, choices)``: ``use(value)`` forces ``value`` inside a block (None: automatic) and yields the
list of what was chosen inside it (whatever the caller passes to ``record``), so a test can assert which choice
each call made; the environment variable ``env`` ("auto" or one of ``choices``) forces it for a whole process;
``forced()`` is the forced value, or None when the choice is automatic. Used by the head matmuls' mode, the
low-precision sweep's path and the CPU attention's precision.
"""
from __future__ import annotations

import contextlib
import contextvars
import os


class Forcing:
    def __init__(self, name: str, env: str, choices: tuple):
        self.name, self.env, self.choices = name, env, tuple(choices)
        self._forced: contextvars.ContextVar = contextvars.ContextVar(f"are_fast_{name}", default=None)
        self._recorder: contextvars.ContextVar = contextvars.ContextVar(f"are_fast_{name}_made", default=None)

    @contextlib.contextmanager
    def use(self, value: str | None = None):
        """Force ``value`` inside the block (None: automatic); yields the list ``record`` appends to."""
        if value is not None and value not in self.choices:
            raise ValueError(f"{self.name}: expected None or one of {', '.join(self.choices)}, got {value!r}")
        made: list = []
        tokens = self._forced.set(value), self._recorder.set(made)
        try:
            yield made
        finally:
            self._forced.reset(tokens[0])
            self._recorder.reset(tokens[1])

    def forced(self) -> str | None:
        """The value forced by ``use`` or the environment variable, None when automatic."""
        value = self._forced.get() or os.environ.get(self.env, "auto")
        if value != "auto" and value not in self.choices:
            raise ValueError(f"{self.env}: expected auto or one of {', '.join(self.choices)}, got {value!r}")
        return None if value == "auto" else value

    def record(self, item) -> None:
        """Append ``item`` to the list of the innermost ``use`` block, if any."""
        made = self._recorder.get()
        if made is not None:
            made.append(item)
