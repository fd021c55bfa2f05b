"""One colour and one display name per model, whatever the figure, order or alias."""
import pytest

from asg_probe.plotting import (COL_COLOR, MODEL_COLORS, ROW_COLOR, display_name, mechanism_color,
                                model_color)
from asg_probe.reference import list_reference_models

MECHANISMS = ["none", "ape", "sincos", "rope-axial", "rope-mixed", "rope-dinov3", "alibi2d", "relpos",
              "rmt-decay", "sdt-decay"]


def test_every_bundled_model_and_mechanism_has_its_own_fixed_colour():
    names = sorted(set(list_reference_models()) | set(MECHANISMS) | {"guidance-shuffled", "sdt-hybrid"})
    missing = [n for n in names if n not in MODEL_COLORS]
    assert not missing, f"no fixed colour for {missing}"
    colours = [MODEL_COLORS[n] for n in names]
    assert len(set(colours)) == len(colours), "two models share a colour"


def test_row_and_column_colours_are_never_a_models():
    assert ROW_COLOR != COL_COLOR
    assert {ROW_COLOR, COL_COLOR}.isdisjoint(MODEL_COLORS.values())
    # nor any colour an unknown name can get
    extra = {model_color(f"model-{i}") for i in range(200)}
    assert {ROW_COLOR, COL_COLOR}.isdisjoint(extra)
    # and an unknown name never takes a known model's colour
    assert extra.isdisjoint(MODEL_COLORS.values())


@pytest.mark.parametrize("alias,name", [("none+guidance", "guidance"), ("none+guidance-random", "guidance-random"),
                                        ("guidance_random", "guidance-random"),
                                        ("none+guidance-shuffled", "guidance-shuffled"), ("ape", "ape"),
                                        ("runs/seed0/final.safetensors", "seed0/final")])
def test_aliases_collapse_to_one_display_name_and_colour(alias, name):
    assert display_name(alias) == name
    assert model_color(alias) == model_color(name)


def test_unknown_names_keep_their_colour_whatever_the_order():
    # the old fallback picked tab10[index], so a model changed colour between figures
    first = [mechanism_color(n, i) for i, n in enumerate(["exp-a", "exp-b", "exp-c"])]
    second = [mechanism_color(n, i) for i, n in enumerate(["exp-c", "exp-b", "exp-a"])]
    assert first == second[::-1]


def test_variants_of_a_known_model_take_its_colour():
    assert model_color("ape-seed1") == MODEL_COLORS["ape"]
    assert model_color("guidance-random-seed2") == MODEL_COLORS["guidance-random"]
    assert model_color("apex") != MODEL_COLORS["ape"]  # a prefix of letters is not a variant
