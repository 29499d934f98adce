"""docs/reliability.md names real tests: every `tests/...::test_name` in it must exist."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_test_named_in_the_reliability_table_exists():
    text = (ROOT / "docs" / "reliability.md").read_text()
    references = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", text)
    assert len(references) >= 20
    for path, name in references:
        tree = ast.parse((ROOT / path).read_text())
        names = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
        assert name in names, f"{path}::{name} is named in docs/reliability.md but does not exist"


CLOCKS = {"monotonic", "perf_counter", "time", "process_time", "monotonic_ns", "perf_counter_ns"}


def test_no_test_asserts_on_the_wall_clock():
    """A timing belongs in a benchmark (``foof bench``): under load a timed assert is flaky."""
    offenders = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Assert):
                continue
            for call in ast.walk(node):
                if (
                    isinstance(call, ast.Call)
                    and isinstance(call.func, ast.Attribute)
                    and call.func.attr in CLOCKS
                    and isinstance(call.func.value, ast.Name)
                    and call.func.value.id == "time"
                ):
                    offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, f"asserts that read the clock: {', '.join(offenders)}"
