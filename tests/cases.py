"""Tiny models and data shared by the math tests: each case is (name, model factory, input shape).

Every case is float64 so that comparisons against dense references can use tight tolerances.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

NUM_CLASSES = 3


@dataclass(frozen=True)
class Case:
    """A tiny classification problem: a model factory and the shape of one input."""

    name: str
    make_model: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    batch_size: int = 6

    def model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.make_model().double()

    def batch(self, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(
            self.batch_size, *self.input_shape, generator=generator, dtype=torch.float64
        )
        y = torch.randint(0, NUM_CLASSES, (self.batch_size,), generator=generator)
        return x, y


def _mlp(bias: bool) -> Callable[[], nn.Module]:
    return lambda: nn.Sequential(
        nn.Linear(4, 5, bias=bias), nn.Tanh(), nn.Linear(5, NUM_CLASSES, bias=bias)
    )


def _conv(stride: int, padding: int | str, dilation: int = 1, bias: bool = True) -> Callable:
    def make() -> nn.Module:
        conv = nn.Conv2d(2, 3, 3, stride=stride, padding=padding, dilation=dilation, bias=bias)
        with torch.no_grad():
            out = conv(torch.zeros(1, 2, 6, 6))
        return nn.Sequential(
            conv, nn.ReLU(), nn.Flatten(), nn.Linear(out.numel(), NUM_CLASSES, bias=bias)
        )

    return make


CASES = [
    Case("linear-bias", _mlp(True), (4,)),
    Case("linear-nobias", _mlp(False), (4,)),
    Case("logistic", lambda: nn.Linear(4, NUM_CLASSES, bias=False), (4,)),
    Case("conv-stride1-pad1", _conv(1, 1), (2, 6, 6), batch_size=3),
    Case("conv-stride2-pad0-nobias", _conv(2, 0, bias=False), (2, 6, 6), batch_size=3),
    Case("conv-stride2-pad2-dil2", _conv(2, 2, dilation=2), (2, 6, 6), batch_size=3),
    Case("conv-same", _conv(1, "same"), (2, 6, 6), batch_size=3),
]
CASE_IDS = [case.name for case in CASES]
