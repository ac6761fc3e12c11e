"""Option enums: string-valued choices that parse user input with a clear error."""

from __future__ import annotations

import enum
from typing import TypeVar

E = TypeVar("E", bound=enum.Enum)


def parse_option(cls: type[E], value: object, what: str) -> E:
    """Return the member of ``cls`` named by ``value`` (a member, or its value as a string).

    Matching ignores case, surrounding blanks, ``_`` and ``-`` (``"Smooth_ReLU"`` names
    ``"smoothrelu"``). Anything else raises ``ValueError`` naming ``what`` and the
    valid choices.
    """
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        key = value.strip().lower().replace("_", "").replace("-", "")
        for member in cls:
            if str(member.value).lower().replace("_", "").replace("-", "") == key:
                return member
    valid = ", ".join(repr(m.value) for m in cls)
    raise ValueError(f"unknown {what} {value!r}; valid choices are {valid}")
