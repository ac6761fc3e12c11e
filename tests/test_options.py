"""The option-enum base class: one ``parse`` for every string-valued option of ptoc."""

import enum
import pickle

import pytest

import ptoc
from ptoc._options import OptionEnum

#: Every option enum of the public API, with the description its error message names.
OPTIONS = [
    (ptoc.Activation, "activation"),
    (ptoc.Opening, "opening layer"),
    (ptoc.LayerInit, "layer initialisation"),
    (ptoc.CoarseWeights, "coarse-weight rule"),
    (ptoc.Relaxation, "relaxation"),
    (ptoc.Cycle, "cycle"),
    (ptoc.msa.InnerSolver, "inner"),
    (ptoc.msa.WeightSet, "kind"),
    (ptoc.msa.RhoSchedule, "rho_schedule"),
    (ptoc.pgcl.LocalUpdate, "local update"),
    (ptoc.pgcl.ColdStart, "cold start"),
    (ptoc.node.Scheme, "ODE scheme"),
    (ptoc.node.NODECoarse, "coarse propagator"),
    (ptoc.kernels.Target, "target"),
]


@pytest.mark.parametrize("cls, what", OPTIONS, ids=[c.__name__ for c, _ in OPTIONS])
def test_every_option_enum_parses_its_values_and_names_itself_in_errors(cls, what):
    assert issubclass(cls, OptionEnum) and "parse" not in vars(cls)
    for member in cls:
        assert cls.parse(member) is member
        assert cls.parse(f"  {member.value.upper()} ") is member
        assert member == member.value and pickle.loads(pickle.dumps(member)) is member
    valid = ", ".join(repr(m.value) for m in cls)
    with pytest.raises(ValueError) as info:
        cls.parse("no-such-choice")
    assert str(info.value) == f"unknown {what} 'no-such-choice'; valid choices are {valid}"
    with pytest.raises(ValueError, match=f"^unknown {what} 3;"):
        cls.parse(3)


def test_matching_ignores_underscores_and_dashes():
    assert ptoc.Activation.parse("Smooth_ReLU") is ptoc.Activation.SMOOTHRELU
    assert ptoc.Activation.parse("smooth-relu") is ptoc.Activation.SMOOTHRELU


def test_an_option_enum_must_say_what_its_values_are():
    with pytest.raises(TypeError, match="must name what its values are"):
        class Colour(OptionEnum):  # the class statement itself fails
            RED = "red"

    class Shade(OptionEnum, what="shade"):
        LIGHT = "light"

    assert isinstance(Shade.LIGHT, str) and isinstance(Shade.LIGHT, enum.Enum)
    assert [m.name for m in Shade] == ["LIGHT"]  # ``what`` is not a member
