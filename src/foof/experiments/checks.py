"""How a figure's claim is judged: metrics read from results files, and checks on them.

A *metric* is a number read from one run's results dictionary (:func:`metric_value`); a run
repeated over seeds gives a list of them, summarised as mean ± std (sample standard deviation).
A *check* compares such summaries and returns a :class:`Outcome` with a verdict:

* ``"yes"``: the claim holds even at the unfavourable end of mean ± std of every side;
* ``"no"``: it fails even at the favourable end;
* ``"inconclusive"``: the answer depends on where within mean ± std the truth lies (or a run
  diverged on both sides);
* ``"missing"``: some run has no complete results;
* ``"not applicable"``: the claim cannot be tested on this stand-in (:class:`NotApplicable`);
  shown with what was measured, it does not enter the figure's verdict.

Checks are frozen dataclasses that serialise to JSON (:meth:`Check.to_dict`,
:func:`check_from_dict`), so that a report can be written from a results directory alone.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

VERDICTS = ("yes", "no", "inconclusive", "missing", "not applicable")
"""Possible verdicts of a check, from best to worst (``"not applicable"`` is set apart)."""

METRICS = {
    "final_train_loss": "final training loss",
    "final_test_accuracy": "final test accuracy",
    "time_per_update": "time per update (s)",
    "metric:kfac-foof-cosine/network_d9_mean": "mean network cosine(KFAC, FOOF·λ_A/λ) in "
    "FOOF's metric",
    "metric:kfac-foof-cosine/layer_mean": "per-layer cosine(KFAC, FOOF) in FOOF's metric, mean "
    "over layers",
    "metric:second-factor-progress/kfac_mean": "mean relative decrease by KFAC's update",
    "metric:second-factor-progress/foof_mean": "mean relative decrease without 2nd factor",
    "metric:second-factor-progress/foof_ge_kfac": "fraction of steps without 2nd factor ≥ KFAC",
    "value:test_nll": "predictive test NLL",
    "value:test_accuracy": "predictive test accuracy",
    "value:test_ece": "test expected calibration error",
    "value:prior_precision": "prior precision τ (chosen on validation)",
}
"""Named metrics and how the report calls them; plus ``metric:<instrument>/<key>`` (a number an
instrument stored in ``results["metrics"]``) and ``value:<key>`` (a number of the toy example)."""

Values = Callable[[str, str], list[float]]
"""``values(label, metric)``: the metric of run ``label`` for each complete seed."""


def metric_name(metric: str) -> str:
    """How the report calls ``metric``."""
    if metric in METRICS:
        return METRICS[metric]
    kind, _, key = metric.partition(":")
    return key if kind in ("metric", "value") else metric


def metric_value(results: dict[str, Any], metric: str) -> float:
    """The number ``metric`` of one run's results (``inf`` for the loss of a diverged run).

    Args:
        results: a results dictionary of :func:`foof.train.train` (or of the toy example).
        metric: ``"final_train_loss"`` (the loss on the whole training set after training if
            the run evaluated it, else the mean loss of the last epoch's mini-batches),
            ``"final_test_accuracy"``, ``"time_per_update"`` (mean seconds per optimizer step
            after the first, amortised inversions included, evaluation and instrumentation
            excluded), ``"metric:<instrument>/<key>"`` or ``"value:<key>"``.

    Returns:
        The value; ``nan`` where the run has none.
    """
    if metric == "final_train_loss":
        if results.get("diverged"):
            return math.inf
        evaluated = results["epochs"].get("train_eval_loss") or []
        value = evaluated[-1] if evaluated else results["final"]["train_loss"]
        return math.inf if value is None else float(value)
    if metric == "final_test_accuracy":
        value = results["final"].get("test_accuracy")
        return math.nan if value is None else float(value)
    if metric == "time_per_update":
        times = results["steps"]["time"]
        if len(times) < 2:
            return math.nan
        return (times[-1] - times[0]) / (len(times) - 1)
    kind, _, key = metric.partition(":")
    if kind == "metric":
        instrument, _, name = key.partition("/")
        value = results.get("metrics", {}).get(instrument, {}).get(name)
        return math.nan if value is None else float(value)
    if kind == "value":
        value = results.get("values", {}).get(key)
        return math.nan if value is None else float(value)
    raise ValueError(f"unknown metric {metric!r}")


@dataclass(frozen=True)
class Summary:
    """Mean ± std of a metric over seeds (``n`` values; ``inf`` mean if any run diverged)."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        """Summarise ``values`` (nan values are dropped)."""
        values = [v for v in values if not math.isnan(v)]
        n = len(values)
        if n == 0:
            return cls(math.nan, math.nan, 0)
        if any(math.isinf(v) for v in values):
            return cls(math.inf, 0.0, n)
        mean = math.fsum(values) / n
        std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
        return cls(mean, std, n)

    @property
    def low(self) -> float:
        """``mean − std``."""
        return self.mean - self.std

    @property
    def high(self) -> float:
        """``mean + std``."""
        return self.mean + self.std

    def __str__(self) -> str:
        if self.n == 0:
            return "n/a"
        if math.isinf(self.mean):
            return "diverged"
        text = format_number(self.mean)
        return text + (f" ± {format_number(self.std)}" if self.n > 1 else "")


def format_number(value: float) -> str:
    """Four significant digits, scientific notation for very small or large values."""
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "inf"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.3e}"
    return f"{value:.4g}"


@dataclass(frozen=True)
class Outcome:
    """The result of a check: a verdict from :data:`VERDICTS` and what was measured."""

    verdict: str
    measured: str


class Check:
    """Base of the checks; subclasses are frozen dataclasses registered in :data:`CHECKS`."""

    kind: ClassVar[str] = ""

    def labels(self) -> tuple[str, ...]:
        """The runs this check reads."""
        raise NotImplementedError

    def describe(self, legends: dict[str, str] | None = None) -> str:
        """The check in words, runs named by their legends where given."""
        raise NotImplementedError

    def evaluate(self, values: Values) -> Outcome:
        """Judge the claim from ``values(label, metric)``."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy, inverted by :func:`check_from_dict`."""
        out = {"kind": self.kind}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def _summaries(self, values: Values, metric: str) -> dict[str, Summary] | None:
        summaries = {label: Summary.of(values(label, metric)) for label in self.labels()}
        return None if any(s.n == 0 for s in summaries.values()) else summaries


def _name(label: str, legends: dict[str, str] | None) -> str:
    return (legends or {}).get(label, label)


def _missing(check: Check, values: Values, metric: str) -> Outcome:
    absent = [label for label in check.labels() if not values(label, metric)]
    return Outcome("missing", "no complete results for " + ", ".join(absent))


@dataclass(frozen=True)
class Below(Check):
    """``factor × mean(a) < mean(b)``: run ``a``'s metric is lower than ``b``'s by ``factor``.

    Example: ``Below("kfac", "natural", factor=10)`` is "KFAC's final training loss is at least
    10× lower than natural gradients'".
    """

    a: str
    b: str
    factor: float = 1.0
    metric: str = "final_train_loss"
    kind: ClassVar[str] = "below"

    def labels(self) -> tuple[str, ...]:
        """``(a, b)``."""
        return (self.a, self.b)

    def describe(self, legends: dict[str, str] | None = None) -> str:
        """E.g. "final training loss: KFAC at least 10× lower than natural gradient"."""
        how = "lower than" if self.factor == 1 else f"at least {self.factor:g}× lower than"
        return (
            f"{metric_name(self.metric)}: {_name(self.a, legends)} {how} {_name(self.b, legends)}"
        )

    def evaluate(self, values: Values) -> Outcome:
        """Yes/no/inconclusive from mean ± std of both runs."""
        s = self._summaries(values, self.metric)
        if s is None:
            return _missing(self, values, self.metric)
        a, b = s[self.a], s[self.b]
        measured = f"{a} vs {b}"
        if math.isinf(a.mean) and math.isinf(b.mean):
            return Outcome("inconclusive", measured + " (both diverged)")
        if math.isinf(b.mean):
            return Outcome("yes", measured)
        if math.isinf(a.mean):
            return Outcome("no", measured)
        if a.mean > 0:
            measured += f"; ratio {format_number(b.mean / a.mean)}×"
        if self.factor * a.high < b.low:
            return Outcome("yes", measured)
        if self.factor * a.low >= b.high:
            return Outcome("no", measured)
        return Outcome("inconclusive", measured)


@dataclass(frozen=True)
class PairedBelow(Below):
    """Per seed, ``factor × a_s < b_s``: run ``a`` beats ``b`` seed by seed (paired seeds).

    Seed ``s`` of both runs shares the initialisation and the data order, so the per-seed ratios
    ``b_s / a_s`` remove the seed-to-seed spread that a comparison of mean ± std keeps. Yes if
    ``a`` wins on every seed, no if it wins on none, else inconclusive. A diverged run loses to
    a finite one; two diverged runs tie (neither wins). The values of both runs must be in seed
    order (as :class:`foof.experiments.report.FigureResults` gives them) and complete for the
    same seeds; different counts give ``"missing"``.

    Example: ``PairedBelow("foof", "kfac")`` is "FOOF's final training loss is lower than
    KFAC's on every seed". The fields are :class:`Below`'s.
    """

    kind: ClassVar[str] = "paired_below"

    def describe(self, legends: dict[str, str] | None = None) -> str:
        """E.g. "final training loss, paired seeds: FOOF lower than KFAC on every seed"."""
        metric, _, rest = super().describe(legends).partition(": ")
        return f"{metric}, paired seeds: {rest} on every seed"

    def evaluate(self, values: Values) -> Outcome:
        """Yes/no/inconclusive from the per-seed wins; measured: per-seed ratios ``b/a``."""
        a, b = values(self.a, self.metric), values(self.b, self.metric)
        if not a or not b:
            return _missing(self, values, self.metric)
        if len(a) != len(b):
            return Outcome("missing", f"unpaired: {len(a)} vs {len(b)} complete seeds")
        ratios, wins, ties = [], 0, 0
        for x, y in zip(a, b):
            if math.isinf(x) and math.isinf(y):
                ratios.append("both diverged")
                ties += 1
                continue
            wins += int(self.factor * x < y)
            ratios.append(format_number(y / x) if x > 0 else "inf" if y > 0 else "n/a")
        measured = (
            f"{Summary.of(a)} vs {Summary.of(b)}; per-seed ratio {_name(self.b, None)}/"
            f"{_name(self.a, None)}: {', '.join(ratios)} ({wins}/{len(a)} seeds won)"
        )
        if wins == len(a):
            return Outcome("yes", measured)
        if wins == 0 and ties < len(a):
            return Outcome("no", measured)
        return Outcome("inconclusive", measured)


@dataclass(frozen=True)
class Near(Check):
    """``mean(a)`` and ``mean(b)`` within a factor ``factor`` of each other (positive metrics)."""

    a: str
    b: str
    factor: float = 2.0
    metric: str = "final_train_loss"
    kind: ClassVar[str] = "near"

    def labels(self) -> tuple[str, ...]:
        """``(a, b)``."""
        return (self.a, self.b)

    def describe(self, legends: dict[str, str] | None = None) -> str:
        """E.g. "final training loss: KFAC (standard damping) within 2× of SGD"."""
        return (
            f"{metric_name(self.metric)}: {_name(self.a, legends)} within "
            f"{self.factor:g}× of {_name(self.b, legends)}"
        )

    def evaluate(self, values: Values) -> Outcome:
        """Yes if even the farthest ends of mean ± std are within the factor."""
        s = self._summaries(values, self.metric)
        if s is None:
            return _missing(self, values, self.metric)
        a, b = s[self.a], s[self.b]
        measured = f"{a} vs {b}"
        if math.isinf(a.mean) or math.isinf(b.mean):
            both = math.isinf(a.mean) and math.isinf(b.mean)
            return Outcome("inconclusive" if both else "no", measured)
        if min(a.low, b.low) <= 0:
            return Outcome("inconclusive", measured + " (not positive)")
        ratio = max(a.mean, b.mean) / min(a.mean, b.mean)
        measured += f"; ratio {format_number(ratio)}×"
        farthest = max(a.high / b.low, b.high / a.low)
        closest = max(1.0, a.low / b.high, b.low / a.high)
        if farthest <= self.factor:
            return Outcome("yes", measured)
        if closest > self.factor:
            return Outcome("no", measured)
        return Outcome("inconclusive", measured)


@dataclass(frozen=True)
class RatioAtMost(Check):
    """``mean(a) / mean(b) <= bound`` (e.g. FOOF's time per update at most 1.25× SGD's)."""

    a: str
    b: str
    bound: float
    metric: str = "time_per_update"
    kind: ClassVar[str] = "ratio_at_most"

    def labels(self) -> tuple[str, ...]:
        """``(a, b)``."""
        return (self.a, self.b)

    def describe(self, legends: dict[str, str] | None = None) -> str:
        """E.g. "time per update: FOOF / SGD at most 1.25"."""
        return (
            f"{metric_name(self.metric)}: {_name(self.a, legends)} / {_name(self.b, legends)} "
            f"at most {self.bound:g}"
        )

    def evaluate(self, values: Values) -> Outcome:
        """Yes if the ratio of the unfavourable ends is within ``bound``."""
        s = self._summaries(values, self.metric)
        if s is None:
            return _missing(self, values, self.metric)
        a, b = s[self.a], s[self.b]
        if not (math.isfinite(a.mean) and math.isfinite(b.mean)) or b.low <= 0:
            return Outcome("inconclusive", f"{a} vs {b}")
        measured = f"{a} vs {b}; ratio {format_number(a.mean / b.mean)}"
        if a.high / b.low <= self.bound:
            return Outcome("yes", measured)
        if a.low / b.high > self.bound:
            return Outcome("no", measured)
        return Outcome("inconclusive", measured)


@dataclass(frozen=True)
class Increasing(Check):
    """The metric's mean increases along ``order`` (e.g. similarity with the damping)."""

    order: tuple[str, ...]
    metric: str
    kind: ClassVar[str] = "increasing"

    def __post_init__(self) -> None:
        object.__setattr__(self, "order", tuple(self.order))

    def labels(self) -> tuple[str, ...]:
        """The runs, in order."""
        return self.order

    def describe(self, legends: dict[str, str] | None = None) -> str:
        """E.g. "cosine: increases along A, B, C"."""
        names = ", ".join(_name(label, legends) for label in self.order)
        return f"{metric_name(self.metric)} increases along {names}"

    def evaluate(self, values: Values) -> Outcome:
        """Yes if strictly increasing with separated mean ± std, no if a step clearly drops."""
        s = self._summaries(values, self.metric)
        if s is None:
            return _missing(self, values, self.metric)
        seq = [s[label] for label in self.order]
        measured = " < ".join(str(x) for x in seq)
        pairs = list(zip(seq, seq[1:]))
        if all(lo.high < hi.low for lo, hi in pairs):
            return Outcome("yes", measured)
        if any(lo.low > hi.high for lo, hi in pairs):
            return Outcome("no", measured)
        return Outcome("inconclusive", measured)


@dataclass(frozen=True)
class Equals(Check):
    """Run ``label``'s metric equals ``expected`` up to ``tolerance`` (absolute)."""

    label: str
    metric: str
    expected: float
    tolerance: float = 1e-9
    kind: ClassVar[str] = "equals"

    def labels(self) -> tuple[str, ...]:
        """``(label,)``."""
        return (self.label,)

    def describe(self, legends: dict[str, str] | None = None) -> str:
        """E.g. "foof_weight_0 = -1"."""
        return f"{metric_name(self.metric)} = {self.expected:g} (paper)"

    def evaluate(self, values: Values) -> Outcome:
        """Yes if every seed is within ``tolerance``."""
        got = values(self.label, self.metric)
        if not got:
            return _missing(self, values, self.metric)
        ok = all(abs(v - self.expected) <= self.tolerance for v in got)
        return Outcome("yes" if ok else "no", ", ".join(format_number(v) for v in got))


@dataclass(frozen=True)
class AtLeast(Check):
    """Run ``label``'s metric is at least (``strict``: above) ``bound`` for every seed."""

    label: str
    metric: str
    bound: float
    strict: bool = False
    kind: ClassVar[str] = "at_least"

    def labels(self) -> tuple[str, ...]:
        """``(label,)``."""
        return (self.label,)

    def describe(self, legends: dict[str, str] | None = None) -> str:
        """E.g. "increase of the loss on datapoint 2 > 0"."""
        relation = ">" if self.strict else "≥"
        name = _name(self.label, legends)
        return f"{metric_name(self.metric)} of {name} {relation} {self.bound:g}"

    def evaluate(self, values: Values) -> Outcome:
        """Yes if every seed reaches ``bound``."""
        got = values(self.label, self.metric)
        if not got:
            return _missing(self, values, self.metric)
        ok = all(v > self.bound if self.strict else v >= self.bound for v in got)
        return Outcome("yes" if ok else "no", ", ".join(format_number(v) for v in got))


@dataclass(frozen=True)
class Exceeds(Check):
    """Within one run, ``metric`` is at least ``other`` (e.g. FOOF's progress vs KFAC's, Fig. 4C).

    With ``t = 1 − tolerance`` ("equal" allows a relative shortfall ``tolerance``): yes if
    ``mean − std`` of ``metric`` is at least ``t ×`` (``mean + std`` of ``other``) over seeds, no
    if ``mean + std`` of ``metric`` is below ``t ×`` (``mean − std`` of ``other``), else
    inconclusive.
    """

    label: str
    metric: str
    other: str
    tolerance: float = 0.0
    kind: ClassVar[str] = "exceeds"

    def labels(self) -> tuple[str, ...]:
        """``(label,)``."""
        return (self.label,)

    def describe(self, legends: dict[str, str] | None = None) -> str:
        """E.g. "along KFAC's trajectory: foof_mean ≥ kfac_mean"."""
        factor = "" if not self.tolerance else f"{1 - self.tolerance:g} × "
        return (
            f"along {_name(self.label, legends)}'s trajectory: {metric_name(self.metric)} ≥ "
            f"{factor}{metric_name(self.other)}"
        )

    def evaluate(self, values: Values) -> Outcome:
        """Yes/no/inconclusive from mean ± std of both metrics."""
        high, low = (
            Summary.of(values(self.label, self.metric)),
            Summary.of(values(self.label, self.other)),
        )
        if high.n == 0 or low.n == 0:
            return _missing(self, values, self.metric)
        measured = f"{high} vs {low}"
        scale = 1.0 - self.tolerance
        if high.low >= scale * low.high:
            return Outcome("yes", measured)
        if high.high < scale * low.low:
            return Outcome("no", measured)
        return Outcome("inconclusive", measured)


@dataclass(frozen=True)
class LowerWorkingDamping(Check):
    """Method ``a`` reaches a good loss at a lower damping than method ``b`` (Fig. 3C/3D).

    For each method and tolerance ``t`` in ``within``, its *working range* is the dampings whose
    mean final loss is within ``t``× of that method's best (a diverged damping is outside); the
    check compares the smallest damping of each range. ``a`` and ``b`` list ``(label,
    damping)`` pairs.

    Per tolerance: yes if ``a``'s smallest working damping is below ``b``'s, no if above,
    inconclusive if equal. A method that still works at the smallest damping of its sweep has
    a smallest working damping at or below it, unknown; the measured text says so (the sweep
    was not extended far enough down). Over the tolerances: yes (no) if every tolerance says
    yes (no), else inconclusive, since the answer then rests on the choice of tolerance.
    """

    a: tuple[tuple[str, float], ...]
    b: tuple[tuple[str, float], ...]
    within: float | tuple[float, ...] = 2.0
    metric: str = "final_train_loss"
    kind: ClassVar[str] = "lower_working_damping"

    def __post_init__(self) -> None:
        object.__setattr__(self, "a", tuple((str(l), float(x)) for l, x in self.a))  # noqa: E741
        object.__setattr__(self, "b", tuple((str(l), float(x)) for l, x in self.b))  # noqa: E741
        within = self.within if isinstance(self.within, (tuple, list)) else (self.within,)
        if not within or any(not float(t) >= 1 for t in within):
            raise ValueError(f"within must be tolerance factors >= 1, got {self.within!r}")
        object.__setattr__(self, "within", tuple(float(t) for t in within))

    @property
    def tolerances(self) -> tuple[float, ...]:
        """The tolerance factors, as a tuple."""
        return self.within  # type: ignore[return-value]

    def labels(self) -> tuple[str, ...]:
        """Every run of both sweeps."""
        return tuple(label for label, _ in (*self.a, *self.b))

    def describe(self, legends: dict[str, str] | None = None) -> str:
        """E.g. "smallest damping within 2× of the best loss: FOOF's below KFAC's"."""
        first, second = _name(self.a[0][0], legends), _name(self.b[0][0], legends)
        factors = "/".join(f"{t:g}" for t in self.tolerances)
        return (
            f"smallest damping with {metric_name(self.metric)} within {factors}× of the "
            f"method's best: lower for {first.split(',')[0]} than for {second.split(',')[0]}"
        )

    def working(
        self, sweep: tuple[tuple[str, float], ...], values: Values, within: float
    ) -> list[float]:
        """The dampings of ``sweep`` whose mean loss is within ``within``× of its best."""
        means = {x: Summary.of(values(label, self.metric)).mean for label, x in sweep}
        finite = [m for m in means.values() if math.isfinite(m)]
        if not finite:
            return []
        best = min(finite)
        return sorted(x for x, m in means.items() if math.isfinite(m) and m <= within * best)

    def evaluate(self, values: Values) -> Outcome:
        """Per tolerance and combined; see the class docstring."""
        if any(not values(label, self.metric) for label in self.labels()):
            return _missing(self, values, self.metric)
        verdicts, parts = [], []
        lowest = {"a": min(x for _, x in self.a), "b": min(x for _, x in self.b)}
        at_edge: list[str] = []
        for within in self.tolerances:
            low = {}
            for side, sweep in (("a", self.a), ("b", self.b)):
                working = self.working(sweep, values, within)
                low[side] = working[0] if working else None
                if working and working[0] == lowest[side] and side not in at_edge:
                    at_edge.append(side)
            if low["a"] is None or low["b"] is None:
                verdict, why = "inconclusive", " (all runs diverged)"
            elif low["a"] < low["b"]:
                verdict, why = "yes", ""
            elif low["a"] > low["b"]:
                verdict, why = "no", ""
            else:
                verdict, why = "inconclusive", " (same)"
            verdicts.append(verdict)
            shown = [f"{x:g}" if x is not None else "none" for x in (low["a"], low["b"])]
            parts.append(f"within {within:g}×: {shown[0]} vs {shown[1]}{why} → {verdict}")
        measured = "; ".join(parts)
        for side in at_edge:
            name = {"a": self.a[0][0], "b": self.b[0][0]}[side].rsplit("-d", 1)[0]
            measured += (
                f"; {name} still works at its sweep's smallest damping {lowest[side]:g}: its "
                "smallest working damping may lie lower"
            )
        if all(v == "yes" for v in verdicts):
            return Outcome("yes", measured)
        if all(v == "no" for v in verdicts):
            return Outcome("no", measured)
        return Outcome("inconclusive", measured)


@dataclass(frozen=True)
class NotApplicable(Check):
    """A check of the paper's claim that this stand-in cannot test, shown but not judged.

    ``check`` is evaluated for its measured text only; the verdict is ``"not applicable"`` and
    ``reason`` says why (e.g. a timing claim about a GPU Wide ResNet, measured on a small CPU
    CNN whose cost is dominated by a layer the paper's network does not have).
    """

    check: dict[str, Any]
    reason: str
    kind: ClassVar[str] = "not_applicable"

    @classmethod
    def of(cls, check: Check, reason: str) -> NotApplicable:
        """Wrap ``check``."""
        return cls(check.to_dict(), reason)

    @property
    def inner(self) -> Check:
        """The wrapped check."""
        return check_from_dict(self.check)

    def labels(self) -> tuple[str, ...]:
        """The wrapped check's runs."""
        return self.inner.labels()

    def describe(self, legends: dict[str, str] | None = None) -> str:
        """The wrapped check's description, marked."""
        return f"{self.inner.describe(legends)} (not applicable here)"

    def evaluate(self, values: Values) -> Outcome:
        """``"not applicable"``, with the wrapped check's measurement and the reason."""
        return Outcome("not applicable", f"{self.inner.evaluate(values).measured}; {self.reason}")


CHECKS: dict[str, type[Check]] = {
    cls.kind: cls
    for cls in (
        Below,
        PairedBelow,
        Near,
        RatioAtMost,
        Increasing,
        Equals,
        AtLeast,
        Exceeds,
        LowerWorkingDamping,
        NotApplicable,
    )
}
"""Check classes by their ``kind``."""


def check_from_dict(values: dict[str, Any]) -> Check:
    """Rebuild a check saved with :meth:`Check.to_dict`."""
    values = dict(values)
    kind = values.pop("kind")
    if kind not in CHECKS:
        raise ValueError(f"unknown check kind {kind!r}; known: {', '.join(CHECKS)}")
    cls = CHECKS[kind]
    if kind == "lower_working_damping":
        values["a"] = tuple(tuple(p) for p in values["a"])
        values["b"] = tuple(tuple(p) for p in values["b"])
        if isinstance(values.get("within"), list):
            values["within"] = tuple(values["within"])
    if kind == "increasing":
        values["order"] = tuple(values["order"])
    return cls(**values)


def combine(verdicts: Sequence[str]) -> str:
    """A figure's verdict: ``no`` if any check fails, else the least certain of the others.

    ``"not applicable"`` checks are left out; a figure with nothing else is not applicable.
    """
    applicable = [v for v in verdicts if v != "not applicable"]
    if verdicts and not applicable:
        return "not applicable"
    verdicts = applicable
    if not verdicts:
        return "missing"
    if "no" in verdicts:
        return "no"
    for verdict in ("missing", "inconclusive"):
        if verdict in verdicts:
            return verdict
    return "yes"
