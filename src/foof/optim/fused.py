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
forward the parameter looks untouched. For the first layer (input = data, no bias) the output
would then not require grad at all and no output gradient would reach it; there the output is
passed through an identity autograd function tied to a constant that requires grad, so that ``E``
still arrives (and nothing, not even the input gradient, is computed for the layer itself).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable

import torch
from torch import nn


class _Reattach(torch.autograd.Function):
    """Identity whose output requires grad (through ``anchor``); backward passes nothing on."""

    @staticmethod
    def forward(ctx: object, output: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        return output.view_as(output)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[None, None]:
        return None, None


class WeightGradientSkipper:
    """Forward hooks that stop autograd from computing the weight gradients of ``modules``.

    On a forward call of a hooked module with ``active()`` true, the module in training mode,
    autograd enabled and ``weight.requires_grad`` true, the weight is detached from the graph of
    that call: ``weight.grad`` stays ``None`` after backward while the output gradient ``E``
    still flows (and can be recorded by :class:`foof.capture.Capture`, whose hook runs after
    this one) and the bias still gets its gradient. An output that would no longer require grad
    (no input, weight or bias in the graph) is re-attached through an identity function.

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

        def after(module: nn.Module, args: tuple, output: object) -> object:
            skipper = self_ref()
            if skipper is not None:
                return skipper._after(module, output)
            return None

        # constant leaves that require grad, one per device and dtype; they never get a gradient
        self._anchors: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        handles = []
        for module in modules:
            handles.append(module.register_forward_pre_hook(before))
            # prepended: the capture's own forward hook must see the re-attached output
            handles.append(module.register_forward_hook(after, always_call=True, prepend=True))
        self._finalizer = weakref.finalize(self, _remove, handles)

    def _before(self, module: nn.Module, args: tuple) -> None:
        weight = module.weight
        if not (
            weight.requires_grad
            and module.training
            and torch.is_grad_enabled()
            and args
            and isinstance(args[0], torch.Tensor)
            and self._active()
        ):
            return
        weight.requires_grad_(False)
        self._skipped.add(module)

    def _after(self, module: nn.Module, output: object) -> object:
        if module not in self._skipped:
            return None
        self._skipped.discard(module)
        module.weight.requires_grad_(True)
        if isinstance(output, torch.Tensor) and not output.requires_grad:
            key = (output.device, output.dtype)
            anchor = self._anchors.get(key)
            if anchor is None:
                anchor = torch.zeros((), device=output.device, dtype=output.dtype)
                anchor = self._anchors[key] = anchor.requires_grad_()
            return _Reattach.apply(output, anchor)
        return None

    def close(self) -> None:
        """Remove the hooks. Safe to call twice."""
        self._finalizer()


def _remove(handles: list) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()
