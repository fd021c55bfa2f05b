"""asg_probe.probes.targets: the coordinates a probe regresses, and the control task."""
import pytest
import torch

from asg_probe.layers import grid as layers_grid
from asg_probe.probes import TARGET_NAMES, control_permutation, coordinate_targets, probe_targets
from asg_probe.probes.targets import resolve_grid
from probe_data import GRID, N


def test_targets_on_a_non_square_grid():
    t = coordinate_targets((2, 3))
    assert t.shape == (6, 2)
    assert t.tolist() == [[0, 0], [0, .5], [0, 1], [1, 0], [1, .5], [1, 1]]
    tall = coordinate_targets((5, 2))
    assert tall[:, 0].tolist() == [0, 0, .25, .25, .5, .5, .75, .75, 1, 1]
    assert tall[:, 1].tolist() == [0, 1] * 5


def test_there_is_one_coordinate_targets_in_the_project():
    assert coordinate_targets is layers_grid.coordinate_targets


def test_a_grid_side_of_one_gives_zero():
    t = coordinate_targets((1, 4))
    assert t[:, 0].tolist() == [0, 0, 0, 0]
    assert t[:, 1].tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1])


def test_control_targets_are_a_fixed_permutation_of_the_true_ones():
    perm = control_permutation(N, seed=3)
    assert torch.equal(perm, control_permutation(N, seed=3))
    assert not torch.equal(perm, control_permutation(N, seed=4))
    assert sorted(perm.tolist()) == list(range(N))
    y = probe_targets(GRID, control_seed=3)
    assert y.shape == (N, len(TARGET_NAMES))
    assert torch.equal(y[:, :2], coordinate_targets(GRID))
    assert torch.equal(y[:, 2:], coordinate_targets(GRID)[perm])


@pytest.mark.parametrize("call, message", [
    (lambda: coordinate_targets((0, 3)), "grid sides must be >= 1, got 0x3"),
    (lambda: coordinate_targets(5), "grid must be a pair"),
    (lambda: resolve_grid(48), "cannot infer a grid from 48"),
    (lambda: resolve_grid(48, (7, 7)), "grid 7x7 has 49 cells"),
    (lambda: control_permutation(0), "num_patches must be >= 1"),
])
def test_bad_grids_raise_a_one_line_value_error(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_square_grid_is_inferred():
    assert resolve_grid(64) == (8, 8)
    assert resolve_grid(48, GRID) == GRID


def test_several_slot_control_seeds_start_with_the_single_one():
    from asg_probe.probes import control_seeds, control_target_names, slot_control_targets

    seeds = control_seeds(7, 3)
    assert seeds == [7, 8, 9]
    t = slot_control_targets(GRID, seeds)
    assert t.shape == (N, 6) and torch.equal(t[:, :2], probe_targets(GRID, control_seed=7)[:, 2:])
    assert control_target_names(seeds)[:2] == TARGET_NAMES[2:]
