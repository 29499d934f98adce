"""Plots survive what real runs produce: diverged runs, panels with no finite point."""

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from foof.experiments.plots import _log_scale  # noqa: E402


def test_log_scale_only_where_there_is_positive_finite_data():
    fig, (finite, diverged) = plt.subplots(1, 2)
    finite.plot([1, 2, 3], [0.5, 0.1, math.nan])
    diverged.plot([1, 2, 3], [math.nan, math.nan, math.inf])  # every run diverged
    _log_scale(finite, "y")
    _log_scale(diverged, "y")
    assert finite.get_yscale() == "log" and diverged.get_yscale() == "linear"
    fig.tight_layout()  # raised "Data cannot be log-scaled" before
    plt.close(fig)
