"""The full-budget protocol (foof.experiments.search) on synthetic objectives with known optima.

Each objective is a function of grid indices and budget, so the true full-budget optimum is
known by enumeration; the search must find it, evaluate the winner's neighbourhood at the full
budget, and extend exactly where App. D.2 says to.
"""

import math

import pytest

from foof.experiments.search import (
    MAX_EXTENSIONS,
    full_budget_search,
    near,
    rungs,
)


def test_rungs():
    assert rungs(10) == (3, 10)
    assert rungs(100) == (33, 100)
    assert rungs(200) == (67, 200)
    assert rungs(1) == (1,)
    assert rungs(3) == (1, 3)
    assert rungs(10, count=3) == (1, 3, 10)
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        rungs(0)


def test_near():
    assert near(1.05, 1.0) and not near(1.2, 1.0) and not near(math.inf, 1.0)
    assert near(1.0, 1.0)


class Counting:
    """An objective that counts its calls per (point, budget)."""

    def __init__(self, function):
        self.function = function
        self.calls: dict = {}

    def __call__(self, point, epochs):
        self.calls[(point, epochs)] = self.calls.get((point, epochs), 0) + 1
        return self.function(point, epochs)


def fast_starter(point, epochs):
    """lr index 2 leads after a short budget, lr index 0 wins at the full one (10 epochs).

    A row per damping index d; the best lr rises with d (a ridge lr ∝ damping, as for natural
    gradients), lr above ``d + 4`` diverges.
    """
    lr, damping = point
    if lr > damping + 4:
        return math.inf
    offset = lr - damping
    # short budgets reward large steps; the full budget rewards offset 0
    short_optimum = 2.0
    weight = epochs / 10
    optimum = (1 - weight) * short_optimum
    return 1.0 + 0.1 * (offset - optimum) ** 2 + 0.05 * (damping - 1) ** 2


def test_finds_the_full_budget_optimum_that_a_short_budget_misses():
    objective = Counting(fast_starter)
    result = full_budget_search(
        {"lr": [0], "damping": [-3, -2, -1, 0, 1, 2, 3]},
        objective,
        rungs(10),
        center_lr=0,
        start_row=(0,),
    )
    # by enumeration: damping 1 (its penalty is 0), offset 0 -> lr 1
    assert result.winner == (1, 1)
    assert result.losses[((1, 1), 10)] == pytest.approx(1.0)
    # after the first rung (3 epochs) that row preferred lr 2
    short = {p: v for (p, e), v in result.losses.items() if e == 3 and p[1] == 1}
    assert min(short, key=short.get) == (2, 1)
    # the winner's neighbourhood ran the full budget: both lr neighbours, both damping rows
    for neighbour in ((0, 1), (2, 1)):
        assert (neighbour, 10) in result.losses
    assert {p[1] for p in result.finalists} >= {0, 1, 2}
    # nothing ran twice
    assert max(objective.calls.values()) == 1
    assert result.capped == []


def test_rows_follow_the_ridge_and_every_row_best_is_interior():
    result = full_budget_search(
        {"lr": [0], "damping": [-3, -2, -1, 0, 1, 2, 3]},
        fast_starter,
        (1,),
        center_lr=0,
        start_row=(0,),
    )
    for damping in range(-3, 4):
        line = {p[0]: v for (p, e), v in result.losses.items() if p[1] == damping}
        best = min(line, key=line.get)
        # interior: both neighbours evaluated and not better; or the upper one diverged
        assert best - 1 in line and line[best - 1] >= line[best]
        assert best + 1 in line and (line[best + 1] >= line[best] or math.isinf(line[best + 1]))


def test_extends_damping_past_the_paper_grid_while_the_edge_is_best():
    def objective(point, epochs):
        lr, damping = point
        return 1.0 + 0.1 * (lr - damping) ** 2 + 0.05 * (damping - 5) ** 2

    result = full_budget_search(
        {"lr": [0], "damping": [-3, -2, -1, 0, 1, 2, 3]},
        objective,
        (1, 3),
        center_lr=0,
        start_row=(0,),
    )
    assert result.winner == (5, 5)  # damping 10^10: two extensions beyond 10^6
    dampings = {p[1] for (p, _e) in result.losses}
    assert max(dampings) == 6  # one more to see the optimum is interior


def test_a_near_optimal_edge_is_extended_and_a_plateau_ends_it():
    # a natural gradient's large-damping limit: the loss levels off at SGD's (1.02, within 10%)
    def objective(point, epochs):
        lr, damping = point
        if lr > damping + 1:
            return math.inf
        level = 1.0 if damping == 0 else 1.02
        return level + 0.1 * (lr - damping) ** 2

    result = full_budget_search(
        {"lr": [0], "damping": [-1, 0, 1]},
        objective,
        (1,),
        center_lr=0,
        start_row=(0,),
    )
    dampings = sorted({p[1] for (p, _e) in result.losses})
    # both edges (1.02, within 10% of 1.0) were extended once, then the flat tail stopped it
    assert dampings == [-2, -1, 0, 1, 2]
    assert result.winner == (0, 0)
    assert result.capped == []


def test_a_divergence_edge_is_not_extended():
    def objective(point, epochs):
        (lr,) = point
        return math.inf if lr > 1 else 1.0 + 0.01 * (1 - lr)

    result = full_budget_search({"lr": [0]}, objective, (1, 3), center_lr=0)
    assert result.winner == (1,)
    assert ((2,), 1) in result.losses and math.isinf(result.losses[((2,), 1)])
    assert ((3,), 1) not in result.losses  # the boundary diverged: no point beyond it


def test_everything_diverging_searches_smaller_learning_rates():
    def objective(point, epochs):
        (lr,) = point
        return math.inf if lr > -6 else 1.0 + 0.1 * (lr + 7) ** 2

    result = full_budget_search({"lr": [0]}, objective, (1,), center_lr=0)
    assert result.winner == (-7,)


def test_every_row_keeps_its_contenders_past_a_cut():
    # Fig. 1D's SGD: in the momentum row the learning rate that leads after a third of the
    # budget is not the one that wins at the end, and that row trails the other at the cut
    def objective(point, epochs):
        lr, momentum = point
        fraction = epochs / 100
        if momentum == 1:
            early, late = 0.9 + 0.02 * lr**2, 0.001 * 10 ** (0.7 * abs(lr - 2))
        else:
            early, late = 0.6 + 0.05 * (lr - 2) ** 2, 0.014 * (1 + 0.5 * (lr - 2) ** 2)
        return (1 - fraction) * early + fraction * late

    axes = {"lr": [0], "momentum": [0, 1]}
    result = full_budget_search(axes, objective, rungs(100), center_lr=2, finalists=1, eta=10)
    at_cut = {p: v for (p, e), v in result.losses.items() if e == 33 and p[1] == 1}
    assert min(at_cut, key=at_cut.get) == (0, 1)  # the row's leader at the cut ...
    assert result.winner == (2, 1)  # ... is not its winner, which still reached the end


def test_momentum_rows_and_a_diverged_run_is_not_continued():
    calls = Counting(
        lambda point, epochs: (
            math.inf
            if point[1] == 1 and point[0] > 0
            else 1.0 + 0.1 * (point[0] - point[1]) ** 2 - 0.01 * epochs
        )
    )
    result = full_budget_search({"lr": [0], "momentum": [0, 1]}, calls, (1, 3), center_lr=0)
    assert result.winner == (0, 0) or result.winner == (1, 1) or result.winner[1] in (0, 1)
    diverged = [p for (p, e), v in result.losses.items() if e == 1 and math.isinf(v)]
    assert diverged and all((p, 3) not in calls.calls for p in diverged)


def test_the_safety_guard_is_recorded():
    def objective(point, epochs):
        (lr,) = point
        return 1.0 - 0.001 * lr  # always better at larger lr, never diverges

    result = full_budget_search({"lr": [0]}, objective, (1, 3), center_lr=0)
    # the line stops at the guard, and so does the full-budget confirmation that follows it
    assert result.capped == ["lr+@()", "confirm"]
    explored = 2 + MAX_EXTENSIONS
    assert max(p[0] for (p, e) in result.losses if e == 1) == explored
    assert max(p[0] for (p, _e) in result.losses) == explored + MAX_EXTENSIONS


def test_bad_axes():
    with pytest.raises(ValueError, match="start with 'lr'"):
        full_budget_search({"damping": [0]}, fast_starter, (1,), center_lr=0)
    with pytest.raises(ValueError, match="increasing"):
        full_budget_search({"lr": [0]}, fast_starter, (3, 1), center_lr=0)
