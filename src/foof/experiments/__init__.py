"""The reproduction suite: the paper's figures as data, one runner, tuning, plots and a report.

* :mod:`~foof.experiments.spec` — :class:`Run` and :class:`Figure` (frozen dataclasses);
* :mod:`~foof.experiments.figures` — every figure in ``quick`` and ``standard`` mode;
* :mod:`~foof.experiments.checks` — metrics read from results files and the claim checks;
* :mod:`~foof.experiments.instruments` — per-step measurements along KFAC's trajectory
  (Figs. 3B, 4C) as :class:`foof.train.TrainCallback` s;
* :mod:`~foof.experiments.toy` — App. F's toy example;
* :mod:`~foof.experiments.runner` — ``foof reproduce`` (resumable, atomic results files);
* :mod:`~foof.experiments.tune` — ``foof tune`` (App. D.2's grid search);
* :mod:`~foof.experiments.hyperparameters` — the tuned values ``reproduce`` uses;
* :mod:`~foof.experiments.report`, :mod:`~foof.experiments.plots` — ``foof report``.

Example:
    >>> from foof.experiments import build
    >>> build("1D", "standard").claim[:40]
    'With full-batch gradients on 1,000 imag'
"""

from foof.experiments.figures import FIGURES, build, figure_id
from foof.experiments.spec import MODES, Figure, Run

__all__ = ["FIGURES", "MODES", "Figure", "Run", "build", "figure_id"]
