"""How a message names a function's parameters: in the words of the interface the user called it through.

A library function's errors tell the user what to change, by parameter name (``tokenizer_gguf=``).
A caller with an interface of its own (the command line) passes ``names``, which maps those parameter
names to what its interface calls them (``{"tokenizer_gguf": "--gguf-tokenizer"}``), so the same
message reaches its user in words they can act on, with no rewriting of the text afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping


class ParameterNames:
    """``names(parameter)``: what to call ``parameter``; ``names.passing(parameter)``: how to say "pass it"."""

    def __init__(self, names: Mapping[str, str] | ParameterNames | None = None) -> None:
        if isinstance(names, ParameterNames):  # handed on by an inner function
            names = names.names
        if names is not None and not isinstance(names, Mapping):
            raise TypeError(
                f"names must be a mapping parameter -> the caller's name for it, got {type(names).__name__}."
            )
        self.names = dict(names or {})

    def __call__(self, parameter: str) -> str:
        """The caller's name for ``parameter``, else the parameter's own (e.g. ``"tokenizer_gguf"``)."""
        return self.names.get(parameter, parameter)

    def passing(self, parameter: str) -> str:
        """The words before a value in "pass ... <value>": the caller's name, else ``"parameter="``."""
        return self.names.get(parameter, f"{parameter}=")
