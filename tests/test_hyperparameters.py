"""The committed hyperparameters meet the full-budget protocol where they claim to (App. D.2)."""

import pytest

from foof.experiments import hyperparameters as hp
from foof.experiments.tune import protocol_problems


def _entries():
    return [
        (f"{key}/{mode}", entry)
        for key, modes in sorted(hp.load(hp.DEFAULT_PATH).items())
        for mode, entry in modes.items()
    ]


@pytest.mark.parametrize(
    "name, entry",
    [item for item in _entries() if item[1].get("protocol") == "full-budget"] or [("none", None)],
)
def test_every_full_budget_entry_has_interior_winners(name, entry):
    if entry is None:
        pytest.skip("no full-budget entry committed yet")
    assert protocol_problems(entry) == [], name


def _entry(grid, values, rungs=(1, 3)):
    return {
        "protocol": "full-budget",
        "axes": ["lr", "damping"],
        "rungs": list(rungs),
        "values": values,
        "capped": [],
        "grid": [{"lr": lr, "damping": d, "epochs": e, "loss": loss} for lr, d, e, loss in grid],
    }


def test_protocol_problems_on_hand_made_entries():
    good = _entry(
        [
            (0.01, 1.0, 1, 0.5),
            (0.03, 1.0, 1, 0.4),
            (0.1, 1.0, 1, 0.45),
            (0.01, 1.0, 3, 0.3),
            (0.03, 1.0, 3, 0.2),
            (0.1, 1.0, 3, None),
        ],
        {"lr": 0.03, "damping": 1.0},
    )
    assert protocol_problems(good) == []  # the upper neighbour diverged: a divergence edge
    edge = _entry(
        [(0.01, 1.0, 1, 0.5), (0.03, 1.0, 1, 0.4), (0.03, 1.0, 3, 0.2), (0.01, 1.0, 3, 0.3)],
        {"lr": 0.03, "damping": 1.0},
    )
    problems = protocol_problems(edge)
    assert any("winner at 3 epochs: lr 0.03 has no neighbour at +1" in p for p in problems)
    assert any("row damping 1 at 1 epochs" in p for p in problems)
    assert protocol_problems({"protocol": "short"}) == [
        "tuned by the 'short' protocol, not 'full-budget'"
    ]


def test_how_many_committed_entries_meet_the_protocol():
    # the report marks every other entry as below protocol; this records the count honestly
    entries = _entries()
    met = [name for name, entry in entries if not protocol_problems(entry)]
    full = [name for name, entry in entries if entry.get("protocol") == "full-budget"]
    assert set(met) == set(full)
