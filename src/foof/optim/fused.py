"""Fused backward: keep autograd from forming weight gradients the optimizer never reads.

A Linear layer's weight gradient is ``Ĝ = EᵀA`` (paper Sec. 2.2), one ``out·rows·in_dim`` GEMM
in autograd's backward. FOOF, KFAC and the natural gradient only need ``Ĝ`` to multiply it
(``Ĝ P``, ``Ḡ⁻¹ Ĝ Ā⁻¹``, ``Gᵀ Ĝ``), and each of those products is as cheap or cheaper
written directly on the recorded ``E`` and ``A`` (``Eᵀ(A P)``, ...). Forming ``Ĝ`` is then
wasted work: for the paper's MLP at batch 100 it is a third of SGD's own step.

:class:`WeightGradientSkipper` switches ``weight.requires_grad`` off for the duration of a
layer's forward call, so the autograd graph of that call has no edge to the weight and the
backward pass computes only the input gradient (and the bias gradient, which is cheap). It is
switched back on right after the call, also when the call raises, so outside the layer's own
forward the parameter looks untouched. Only calls whose input requires grad are changed: for the
first layer (input = data) skipping the weight would leave nothing to backpropagate through,
so its gradient is formed as usual.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable

import torch
from torch import nn


class WeightGradientSkipper:
    """Forward hooks that stop autograd from computing the weight gradients of ``modules``.

    On a forward call of a hooked module with ``active()`` true, the module in training mode,
    autograd enabled, ``weight.requires_grad`` true and an input that requires grad, the weight
    is detached from the graph of that call: ``weight.grad`` stays ``None`` after backward while
    the output gradient ``E`` still flows (and can be recorded by :class:`foof.capture.Capture`)
    and the bias still gets its gradient.

    Args:
        modules: layers with a ``weight`` (``nn.Linear``, ``nn.Conv2d``).
        active: asked at every forward call; False leaves the call as it is.

    Call :meth:`close` to remove the hooks (they are also removed when the skipper is
    garbage-collected).
    """

    def __init__(self, modules: Iterable[nn.Module], active: Callable[[], bool]) -> None:
        self._active = active
        self._skipped: set[nn.Module] = set()
        self_ref = weakref.ref(self)

        def before(module: nn.Module, args: tuple) -> None:
            skipper = self_ref()
            if skipper is not None:
                skipper._before(module, args)

        def after(module: nn.Module, args: tuple, output: object) -> None:
            skipper = self_ref()
            if skipper is not None:
                skipper._after(module)

        handles = []
        for module in modules:
            handles.append(module.register_forward_pre_hook(before))
            handles.append(module.register_forward_hook(after, always_call=True))
        self._finalizer = weakref.finalize(self, _remove, handles)

    def _before(self, module: nn.Module, args: tuple) -> None:
        weight = module.weight
        if not (
            weight.requires_grad
            and module.training
            and torch.is_grad_enabled()
            and args
            and isinstance(args[0], torch.Tensor)
            and args[0].requires_grad
            and self._active()
        ):
            return
        weight.requires_grad_(False)
        self._skipped.add(module)

    def _after(self, module: nn.Module) -> None:
        if module in self._skipped:
            self._skipped.discard(module)
            module.weight.requires_grad_(True)

    def close(self) -> None:
        """Remove the hooks. Safe to call twice."""
        self._finalizer()


def _remove(handles: list) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()
