"""The full-budget tuning protocol (App. D.2) as a search over grid indices, free of training.

The paper picks "the hyperparameters which give best training loss at the end of training" and
extends a grid "if the performance at a boundary of the grid was optimal (or near optimal)".
Training every grid point for the whole budget is what that asks; on this machine it would take
days per figure, so :func:`full_budget_search` runs successive halving on prefixes of the
full-budget runs (the learning rate is constant, so the first ``k`` epochs of a full run *are*
the ``k``-epoch run) and decides only on full-budget losses at the end:

1. **Explore** at the first rung: for every row (a damping and/or momentum value) a
   learning-rate line search, five values centred on the inner neighbouring row's best, each
   side extended while its edge point is the row's best or within ``near`` of it, unless that
   edge diverged (a divergence boundary); then the damping axis is extended the same way on the
   rows' bests. Extensions are uncapped except for a plateau rule (once a side was extended, an
   edge that improves on its inner neighbour by less than 1% stops it: the large-damping limit
   of a natural gradient is SGD, whose loss no longer changes with more damping) and a safety
   guard that is recorded if it is ever reached.
2. **Halve**: the best ``1/eta`` (at least ``finalists``) of the points alive at one rung,
   and every row's points within ``near`` of that row's best, continue to the next; the last
   rung is the full budget.
3. **Confirm** at the full budget: the winner's learning-rate neighbours in its row and the best
   points of its neighbouring rows also run the full budget; if one of them is better it
   becomes the winner and its neighbourhood is confirmed in turn. So the winner is a local
   optimum of the *final* loss, never an artefact of a short budget (a fast starter that a
   smaller learning rate overtakes later loses here), and never on an unexplored edge.

A point is a tuple of grid indices, learning rate first (see :func:`foof.experiments.tune.
lr_value`), then the other axes in the order given. Losses are ``inf`` for diverged runs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

Point = tuple[int, ...]
Evaluate = Callable[[Point, int], float]
"""``evaluate(point, epochs)``: the final training loss of ``point`` after ``epochs`` epochs."""

NEAR = 0.10
"""A point within this fraction of the best loss is "near optimal" (App. D.2) for extensions."""

PLATEAU = 0.01
"""An extension that improves on its inner neighbour by less than this fraction is a plateau."""

MAX_EXTENSIONS = 12
"""Safety guard per side and axis; reaching it is recorded (``capped``), never silent."""


def rungs(epochs: int, eta: int = 3, count: int = 2) -> tuple[int, ...]:
    """Budgets (epochs) of successive halving: ``epochs/eta^k`` for ``k = count-1 … 0``.

    Rounded to whole epochs, duplicates dropped, the last always ``epochs``: 10 epochs give
    ``(3, 10)``, 100 give ``(33, 100)``, 1 gives ``(1,)``. The first cut comes at a third of the
    budget, not a ninth: on Fig. 1D's full-batch runs SGD with momentum 0.9 trails plain SGD
    after 11 of 100 epochs and ends 13x below it, a crossing a cut at 11 epochs misses.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs!r}")
    values = sorted({max(1, round(epochs / eta**k)) for k in range(count)})
    return tuple(values)


def near(loss: float, best: float, tolerance: float = NEAR) -> bool:
    """Whether ``loss`` is the best or within ``tolerance`` (relative) of ``best``."""
    if math.isinf(loss):
        return False
    return loss <= best + tolerance * abs(best)


@dataclass
class SearchResult:
    """What :func:`full_budget_search` found.

    Attributes:
        winner: the point with the best full-budget loss, confirmed locally.
        losses: ``{(point, epochs): loss}`` for every evaluation.
        rungs: the budgets used.
        finalists: the points that reached the full budget (in the order they got there).
        capped: axes/sides whose extension hit :data:`MAX_EXTENSIONS` (``"lr@row"``,
            ``"damping-"``...); empty when the search ended on its own rules.
    """

    winner: Point
    losses: dict[tuple[Point, int], float]
    rungs: tuple[int, ...]
    finalists: list[Point] = field(default_factory=list)
    capped: list[str] = field(default_factory=list)

    def deepest(self) -> dict[Point, tuple[int, float]]:
        """Each point's largest budget and its loss there."""
        best: dict[Point, tuple[int, float]] = {}
        for (point, epochs), loss in self.losses.items():
            if point not in best or epochs > best[point][0]:
                best[point] = (epochs, loss)
        return best


def full_budget_search(
    axes: dict[str, list[int]],
    evaluate: Evaluate,
    budgets: Sequence[int],
    *,
    center_lr: int,
    start_row: Point | None = None,
    eta: int = 3,
    finalists: int = 3,
    tolerance: float = NEAR,
) -> SearchResult:
    """Run the protocol of the module docstring.

    Args:
        axes: ``{"lr": [...], "damping": [...], "momentum": [...]}``: grid indices of the
            starting grid; ``"lr"`` must come first. Only the learning-rate line of each row
            and the ``"damping"`` axis are extended; other axes (momentum) are fixed sets.
        evaluate: trains a point for a budget and returns its final training loss (``inf`` if
            diverged); calls with a larger budget for the same point continue the same run.
        budgets: the rungs, increasing, the last the full budget (see :func:`rungs`).
        center_lr: learning-rate index the first row's line is centred on.
        start_row: the row (non-lr indices) searched first; default the middle of each axis.
        eta: halving factor.
        finalists: at least this many points run the full budget.
        tolerance: "near optimal" for extensions (:data:`NEAR`).

    Returns:
        The :class:`SearchResult`.
    """
    names = list(axes)
    if not names or names[0] != "lr":
        raise ValueError(f"axes must start with 'lr', got {names}")
    budgets = tuple(budgets)
    if not budgets or list(budgets) != sorted(set(budgets)):
        raise ValueError(f"budgets must be increasing, got {budgets}")
    losses: dict[tuple[Point, int], float] = {}
    capped: list[str] = []

    def run(points: Sequence[Point], epochs: int) -> None:
        for point in points:
            if (point, epochs) not in losses:
                # a diverged run stays diverged: no need to continue it
                earlier = [
                    losses[(point, e)] for e in budgets if e < epochs and (point, e) in losses
                ]
                if earlier and math.isinf(earlier[-1]):
                    losses[(point, epochs)] = math.inf
                else:
                    losses[(point, epochs)] = float(evaluate(point, epochs))

    first = budgets[0]
    row_names = names[1:]
    rows_axes = {name: list(axes[name]) for name in row_names}
    row_best: dict[Point, Point] = {}

    def line_search(row: Point, middle: int) -> Point:
        values = list(range(middle - 2, middle + 3))
        extended = {-1: 0, 1: 0}
        while True:
            run([(lr, *row) for lr in values], first)
            line = {lr: losses[((lr, *row), first)] for lr in values}
            best_lr = min(values, key=lambda lr: (line[lr], lr))
            best = line[best_lr]
            if math.isinf(best):
                side = -1  # nothing trains: only smaller learning rates can help
            else:
                low, high = line[values[0]], line[values[-1]]
                if near(low, best, tolerance) and not (extended[-1] and _flat(line, values, -1)):
                    side = -1
                elif near(high, best, tolerance) and not (extended[1] and _flat(line, values, 1)):
                    side = 1  # the high edge trains (not a divergence boundary)
                else:
                    return (best_lr, *row)
            if extended[side] >= MAX_EXTENSIONS:
                capped.append(f"lr{'-' if side < 0 else '+'}@{row}")
                return (best_lr, *row)
            extended[side] += 1
            if side < 0:
                values.insert(0, values[0] - 1)
            else:
                values.append(values[-1] + 1)

    def search_row(row: Point, neighbour: Point | None) -> None:
        middle = center_lr if neighbour is None else row_best[neighbour][0]
        row_best[row] = line_search(row, middle)

    # rows in order outward from the start, each centred on its inner neighbour's best lr
    if "damping" in rows_axes:
        position = row_names.index("damping")
        others = [rows_axes[n] for n in row_names if n != "damping"]
        dampings = rows_axes["damping"]
        target = start_row[position] if start_row is not None else dampings[len(dampings) // 2]
        begin = min(range(len(dampings)), key=lambda k: abs(dampings[k] - target))

        def row_of(damping: int, rest: tuple) -> Point:
            return (*rest[:position], damping, *rest[position:])

        def search_damping(damping: int, neighbour: int | None) -> None:
            for rest in itertools.product(*others):
                inner = None if neighbour is None else row_of(neighbour, rest)
                search_row(row_of(damping, rest), inner)

        search_damping(dampings[begin], None)
        for k in range(begin - 1, -1, -1):
            search_damping(dampings[k], dampings[k + 1])
        for k in range(begin + 1, len(dampings)):
            search_damping(dampings[k], dampings[k - 1])

        def damping_best(damping: int) -> float:
            return min(
                losses[(row_best[row_of(damping, rest)], first)]
                for rest in itertools.product(*others)
            )

        extended = {-1: 0, 1: 0}
        while True:
            overall = min(damping_best(d) for d in dampings)
            side = 0
            ends = ((-1, dampings[0], dampings[1:2]), (1, dampings[-1], dampings[-2:-1]))
            for candidate, edge, inner in ends:
                edge_loss = damping_best(edge)
                flat = bool(inner) and not edge_loss < damping_best(inner[0]) * (1 - PLATEAU)
                if near(edge_loss, overall, tolerance) and not (extended[candidate] and flat):
                    side = candidate
                    break
            if side == 0:
                break
            if extended[side] >= MAX_EXTENSIONS:
                capped.append(f"damping{'-' if side < 0 else '+'}")
                break
            extended[side] += 1
            if side < 0:
                dampings.insert(0, dampings[0] - 1)
                search_damping(dampings[0], dampings[1])
            else:
                dampings.append(dampings[-1] + 1)
                search_damping(dampings[-1], dampings[-2])
    else:
        for row in itertools.product(*(rows_axes[n] for n in row_names)):
            search_row(tuple(row), None)

    # successive halving on prefixes of the full-budget runs
    alive = sorted(
        (p for (p, e), v in losses.items() if e == first and not math.isinf(v)),
        key=lambda p: (losses[(p, first)], p),
    )
    if not alive:  # nothing trains at all: report the best of the diverged
        winner = min(p for (p, _e) in losses)
        return SearchResult(winner, losses, budgets, [], capped)
    previous = first
    for epochs in budgets[1:]:
        keep = max(finalists, math.ceil(len(alive) / eta))
        promoted = set(alive[:keep]) | _row_contenders(alive, losses, previous, tolerance)
        alive = sorted(promoted, key=lambda p: (losses[(p, previous)], p))
        run(alive, epochs)
        alive = sorted(alive, key=lambda p: (losses[(p, epochs)], p))
        previous = epochs
    full = budgets[-1]
    reached = list(alive)

    # confirm the winner's neighbourhood at the full budget
    def neighbours(point: Point) -> list[Point]:
        lr, row = point[0], point[1:]
        found = [(lr - 1, *row), (lr + 1, *row)]
        for k, name in enumerate(row_names):
            values = rows_axes[name]
            here = values.index(row[k]) if row[k] in values else None
            if here is None:
                continue
            for step in (-1, 1):
                if 0 <= here + step < len(values):
                    other = (*row[:k], values[here + step], *row[k + 1 :])
                    if other in row_best:
                        found.append(row_best[other])
        return found

    moves = 0
    while True:
        winner = min((p for (p, e) in losses if e == full), key=lambda p: (losses[(p, full)], p))
        pending = [p for p in neighbours(winner) if (p, full) not in losses]
        if not pending:
            break
        if moves >= MAX_EXTENSIONS:
            capped.append("confirm")
            break
        moves += 1
        run(pending, full)
        reached += [p for p in pending if p not in reached]
    return SearchResult(winner, losses, budgets, reached, capped)


def _row_contenders(
    alive: list[Point], losses: dict[tuple[Point, int], float], epochs: int, tolerance: float
) -> set[Point]:
    """Every row's points within ``tolerance`` of that row's best after ``epochs``.

    Curves of different rows (momentum 0 vs 0.9, one damping vs another) and of learning rates
    close to a row's best cross late in training, so each row keeps its contenders past a cut
    even when the global top ``1/eta`` is filled by another row.
    """
    rows: dict[Point, list[Point]] = {}
    for point in alive:
        rows.setdefault(point[1:], []).append(point)
    kept: set[Point] = set()
    for points in rows.values():
        best = min(losses[(p, epochs)] for p in points)
        kept |= {p for p in points if near(losses[(p, epochs)], best, tolerance)}
    return kept


def _flat(line: dict[int, float], values: list[int], side: int) -> bool:
    """Whether the (extended) edge on ``side`` improves on its inner neighbour by < 1%.

    An edge that is the line's best is never flat. Checked only after a side was extended once,
    so a near-optimal edge of the starting grid is always extended at least once (App. D.2) and
    a tail that stays level (a plateau) ends the extension.
    """
    edge, inner = (values[0], values[1]) if side < 0 else (values[-1], values[-2])
    if line[edge] == min(line.values()):
        return False
    return not line[edge] < line[inner] * (1 - PLATEAU)
