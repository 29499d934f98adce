"""Benchmarks: per-step time of every optimizer as a ratio to SGD+momentum (issue 5).

``foof bench`` (or :func:`run_benchmark`) times every method on the paper's MLP, the
autoencoder and a small CNN, interleaved in one process; measures memory; profiles FOOF and
KFAC; and times each method to Adam's training loss on Fashion-MNIST. Peer libraries (ASDL)
run in the same process when installed. The results are a Markdown table and a JSON file.

Modules: :mod:`~foof.benchmarks.methods` (workloads and methods), :mod:`~.timing`
(interleaved timing and memory), :mod:`~.profiling`, :mod:`~.target` (time to target),
:mod:`~.report` (Markdown and the targets' verdicts), :mod:`~.runner`, :mod:`~.command`.
"""

from foof.benchmarks.command import add_commands
from foof.benchmarks.methods import Method, Workload, default_workloads
from foof.benchmarks.runner import BenchConfig, quick_config, run_benchmark, write_report
from foof.benchmarks.target import TargetConfig

__all__ = [
    "BenchConfig",
    "Method",
    "TargetConfig",
    "Workload",
    "add_commands",
    "default_workloads",
    "quick_config",
    "run_benchmark",
    "write_report",
]
