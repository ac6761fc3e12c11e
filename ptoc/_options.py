"""Option enums: string-valued choices that parse user input with a clear error.

An option enum derives from :class:`OptionEnum` and names, in its class statement, what
its values are, for the error message::

    class Cycle(OptionEnum, what="cycle"):
        V = "V"
        F = "F"

    Cycle.parse("v")        # Cycle.V
    Cycle.parse("W")        # ValueError: unknown cycle 'W'; valid choices are 'V', 'F'
"""

from __future__ import annotations

import enum
from typing import ClassVar, TypeVar

__all__ = ["OptionEnum", "parse_option"]

E = TypeVar("E", bound=enum.Enum)
T = TypeVar("T", bound="OptionEnum")


def parse_option(cls: type[E], value: object, what: str) -> E:
    """Return the member of ``cls`` named by ``value`` (a member, or its value as a string).

    Matching ignores case, surrounding blanks, ``_`` and ``-`` (``"Smooth_ReLU"`` names
    ``"smoothrelu"``). Anything else raises ``ValueError`` naming ``what`` and the
    valid choices.

    Parameters
    ----------
    cls : type of enum.Enum
        The enum to look ``value`` up in.
    value : object
        A member of ``cls``, or a string naming one.
    what : str
        What the values are (``"activation"``), for the error message.

    Returns
    -------
    enum.Enum
        The member of ``cls``.

    Raises
    ------
    ValueError
        ``unknown <what> <value!r>; valid choices are ...`` when nothing matches.
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


class OptionEnum(str, enum.Enum):
    """Base class of ptoc's string-valued option enums.

    A subclass gives ``what=`` in its class statement (``class Cycle(OptionEnum,
    what="cycle")``): the description of its values that :meth:`parse` puts in its error
    message. The members are strings (``Cycle.V == "V"``), so they compare equal to, and
    serialise as, their values.
    """

    #: What the values are, for error messages (set from ``what=``).
    _what: ClassVar[str]

    def __init_subclass__(cls, *, what: str | None = None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if not what:
            raise TypeError(f"option enum {cls.__name__} must name what its values are: "
                            f"class {cls.__name__}(OptionEnum, what='...')")
        cls._what = what

    @classmethod
    def parse(cls: type[T], value: T | str) -> T:
        """The member named by ``value``: a member, or its value as a string.

        Case, surrounding blanks, ``_`` and ``-`` are ignored (see :func:`parse_option`).

        Parameters
        ----------
        value : member or str
            What to look up.

        Returns
        -------
        OptionEnum
            The member of this enum.

        Raises
        ------
        ValueError
            Naming what the values are and listing the valid choices.
        """
        return parse_option(cls, value, cls._what)
