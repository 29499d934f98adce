"""What every curvature optimizer in foof shares: capture, the update, state, validation.

A method only says which statistics it needs on a step, how it turns them into curvature, and
how it preconditions a layer's gradient matrix; :class:`CurvatureOptimizer` does the rest
(hooks, momentum, weight decay, the SGD fallback for unsupported layers, the step counter,
checkpoints) the same way for all of them.
"""

from __future__ import annotations

import itertools
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from foof import distributed
from foof.capture import (
    Capture,
    block_layers,
    is_supported,
    layer_bias,
    layer_in_dim,
    layer_out_dim,
    weight_layout,
)
from foof.curvature.sampling import FisherSampler
from foof.optim.fused import WeightGradientSkipper
from foof.validation import check_choice, check_range

NONFINITE_POLICIES = ("skip", "raise")

#: the fallback optimizers known by name (``fallback="adamw"``, e.g. from the command line).
FALLBACKS: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
}

#: the live foof optimizers hooked into each layer, to warn when a second one hooks the same
#: model (weak on both sides: neither the layer nor the optimizer is kept alive by it)
_HOOKED_BY: weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet] = weakref.WeakKeyDictionary()


class NonFiniteError(FloatingPointError):
    """A step met a NaN/Inf (loss, gradient or statistic) under ``nonfinite="raise"``."""


def gradient_matrix(module: nn.Module, zero_if_missing: bool = False) -> Tensor | None:
    """The layer's gradient as one matrix ``Ĝ = [∇W, ∇b]``: ``(out, in_dim)``, or None.

    ``in_dim`` is ``in_features`` (Linear) or ``C_in·kh·kw`` (Conv2d), plus one column for the
    bias when the layer has one (a frozen bias contributes a zero column). A layer without a
    gradient gives None, or zeros with ``zero_if_missing``. An ``nn.Embedding`` gives
    ``weight.grad.T`` ``(embedding_dim, num_embeddings)``: a Linear layer on one-hot inputs.
    """
    weight = module.weight
    if weight.grad is None:
        if not zero_if_missing:
            return None
        grad = torch.zeros_like(weight).flatten(1)
    else:
        grad = weight.grad.flatten(1)
    if isinstance(module, nn.Embedding):
        return grad.T
    bias = layer_bias(module)
    if bias is not None:
        bias_grad = bias.grad
        if bias_grad is None:
            bias_grad = torch.zeros_like(bias)
        grad = torch.cat([grad, bias_grad.unsqueeze(1)], dim=1)
    return grad


def resolve_fallback(
    fallback: type[torch.optim.Optimizer] | str | None,
) -> type[torch.optim.Optimizer] | None:
    """The fallback optimizer class: a ``torch.optim.Optimizer`` subclass, a name, or None.

    ``None`` (or ``"none"``) means no fallback optimizer: those parameters get the plain
    SGD(+momentum) rule with their group's own hyperparameters.

    Raises:
        ValueError: an unknown name. TypeError: anything else but an optimizer class taking
            parameters (foof's own optimizers take a model).
    """
    if fallback is None or fallback == "none":
        return None
    if isinstance(fallback, str):
        check_choice("fallback", fallback, (*FALLBACKS, "none"))
        return FALLBACKS[fallback]
    if (
        isinstance(fallback, type)
        and issubclass(fallback, torch.optim.Optimizer)
        and not issubclass(fallback, CurvatureOptimizer)
    ):
        return fallback
    raise TypeError(
        "fallback must be a torch.optim.Optimizer class (e.g. torch.optim.AdamW), one of "
        f"{', '.join(map(repr, FALLBACKS))}, or None; got {fallback!r}"
    )


def _as_group(given: Any, where: str) -> dict[str, Any]:
    """A copy of a user's param group with ``params`` as a list, as ``torch.optim`` takes it."""
    if not isinstance(given, dict) or "params" not in given:
        raise TypeError(f"{where} must be a dict with a 'params' entry, got {given!r}")
    params = given["params"]
    params = [params] if isinstance(params, Tensor) else list(params)
    return {**given, "params": params}


class CurvatureOptimizer(torch.optim.Optimizer):
    """Base class: a ``torch.optim.Optimizer`` that preconditions Linear/Conv2d layers.

    Subclasses implement :meth:`update_curvature` (turn this step's captured statistics into
    whatever they invert) and :meth:`precondition` (map a layer's gradient matrix ``Ĝ`` to the
    direction ``D``). This class then applies, per parameter group hyperparameters:

    * momentum as in ``torch.optim.SGD`` on ``D`` (``buf = momentum·buf + D``),
    * decoupled weight decay ``W ← W − lr·weight_decay·W``,
    * ``W ← W − lr·buf``,

    and sends every parameter that no supported layer owns (norms, embeddings, positional
    parameters, ...) to a fallback optimizer (``fallback``, AdamW by default, with its own
    options ``fallback_options``), after one warning naming those parameters and their group.
    ``fallback=None`` gives them the same rule with ``D = ∇`` instead (plain SGD with momentum
    at their group's lr: what the paper's MLP/CNN protocols use, see
    :func:`foof.optim.registry.build_optimizer`).

    With ``fused_backward=True`` autograd does not form the weight gradients ``Ĝ = EᵀA`` of the
    preconditioned Linear layers whose input requires grad (see :mod:`foof.optim.fused`;
    convolutions keep autograd's weight-gradient kernel, which beats forming ``EᵀA`` from
    unfolded patches on every step): their
    ``weight.grad`` stays ``None`` and the method computes its direction from the recorded
    ``E`` and ``A`` (:meth:`precondition_factors`), the same update up to rounding. Nothing that
    reads those gradients between backward and step (clipping, logging) sees them; biases and
    unsupported layers keep their gradients. Not available under ``torch.distributed`` (DDP
    reduces gradients, which would then not exist).

    Parameter groups, as in ``torch.optim``: ``param_groups=[{"params": ..., "lr": ...}, ...]``
    names groups of the model's parameters with their own options; the model's other
    parameters form group 0 (those of supported layers; all of them with ``fallback=None``)
    and, last, the fallback's group. A layer's curvature options (``damping``, ``ema_decay``,
    KFAC's ``damping_mode`` and ``second_factor``) and momentum are those of the group holding
    its weight; ``lr`` and ``weight_decay`` apply per parameter, so a bias may sit in a group
    without weight decay. A group holds either parameters of supported layers (this
    optimizer's options) or parameters outside them (the fallback's options, e.g. ``betas``),
    never both. The schedule is the optimizer's, not a group's: the step counter
    ``param_groups[0]["step"]`` and :attr:`global_options` (``inv_every``, ``stats_steps``,
    ``inv_warmup``, ...) live in group 0 only, and a group giving one of them another value is
    refused. LR schedulers (one lambda per group) and edits of ``param_groups[i]`` work as with
    any torch optimizer; the fallback optimizer shares these very group dicts and the state,
    so it is scheduled, zeroed, saved and restored with this optimizer. Per-layer state
    (factors, inverses, momentum) is stored under the layer's weight, the fallback's under each
    of its parameters, as ``torch.optim`` lays it out.

    Every parameter of the model is in a group, frozen ones included. A parameter with
    ``requires_grad=False`` (or without a gradient) is left alone on a step; one unfrozen later
    (gradual unfreezing) trains from then on, and a supported layer whose weight is unfrozen is
    preconditioned from its first statistics step (until then, if that is not the step it is
    unfrozen on, it gets a plain gradient step, with a warning). ``add_param_group`` adds
    parameters outside the model's layers (a new ``nn.Parameter``): they go to the fallback
    (or, with ``fallback=None``, to a group with this optimizer's options). It refuses a
    parameter already in a group and one of a layer attached to the model after construction
    (not hooked). :attr:`layers` are the supported layers whose weight is trainable right now.

    Statistics belong to the training forward passes since the last ``step()``, which clears
    them: ``zero_grad()`` may come before the forward pass or between forward and backward
    (see :meth:`zero_grad`), and micro-batches accumulated before one step all count.

    A step is skipped, changing nothing (parameters, momentum, statistics, the step counter),
    when it meets a NaN/Inf (see ``nonfinite``) or an empty batch (no input row reached any
    layer, e.g. the last batch of a filtered loader); each cause warns once.
    ``step()`` without a gradient (no backward since the last ``zero_grad()``) raises.
    """

    #: state keys holding curvature factors; kept in their own dtype across load_state_dict.
    factor_keys: tuple[str, ...] = ()
    #: the Fisher's extra backward pass, for methods that need one (KFAC, natural gradients).
    sampler: FisherSampler | None = None
    #: options of the whole optimizer, not of a group (kept in ``param_groups[0]`` with the
    #: step counter; a group given another value is refused).
    global_options: tuple[str, ...] = ("nonfinite",)
    #: which layers the method preconditions (FOOF and KFAC: :func:`foof.capture.is_block`).
    supports = staticmethod(is_supported)

    def __init__(
        self,
        model: nn.Module,
        defaults: dict[str, Any],
        fused_backward: bool = False,
        param_groups: Iterable[dict[str, Any]] | None = None,
        fallback: type[torch.optim.Optimizer] | str | None = None,
        fallback_options: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{type(self).__name__} takes the model (an nn.Module), got "
                f"{type(model).__name__}; it hooks into the model's layers to capture their inputs"
            )
        defaults.setdefault("nonfinite", "skip")
        check_choice("nonfinite", defaults["nonfinite"], NONFINITE_POLICIES)
        self._check_group_values(defaults, "the optimizer")
        fallback_class = resolve_fallback(fallback)
        if fallback_class is None and fallback_options:
            raise ValueError(
                f"fallback_options {fallback_options!r} given without a fallback optimizer "
                "(fallback=None gives those parameters the plain SGD rule of their group)"
            )
        # Every parameter, frozen ones included, as torch.optim keeps them: one frozen now and
        # unfrozen later (gradual unfreezing) is then updated instead of silently left out.
        params = list(model.parameters())
        if not any(p.requires_grad for p in params):
            raise ValueError("the model has no trainable parameters")
        #: every supported layer of the model, trainable or not (see :attr:`layers`).
        self.model_layers: dict[str, nn.Module] = block_layers(model, self.supports)
        self._param_names = {id(p): name for name, p in model.named_parameters()}
        owned = {id(p) for m in self.model_layers.values() for p in m.parameters(recurse=False)}
        self._model = weakref.ref(model)  # the optimizer does not own the model
        self._fallback_class = fallback_class
        self._fallback_options = dict(fallback_options or {})
        groups = self._initial_groups(params, owned, param_groups, fallback_class)
        fallback_groups = [g for g in groups if g.get("fallback")]
        #: the optimizer of the parameters outside every curvature block (None: plain SGD in
        #: their own group); its param groups and state are this optimizer's own (shared).
        self.fallback: torch.optim.Optimizer | None = None
        if fallback_groups:  # it fills in its defaults in those very dicts
            self.fallback = self._build_fallback(fallback_groups, self._fallback_options)
        super().__init__(groups, defaults)
        # the schedule is the optimizer's: its keys and the step counter live in group 0 only
        self.param_groups[0].update({k: defaults[k] for k in self.global_options}, step=0)
        self._built = True
        self._link_fallback()
        #: parameters outside every supported layer that take the plain SGD rule of their
        #: group (``fallback=None``); with a fallback optimizer they are its parameters.
        self.other_params = [
            p
            for g in self.param_groups
            if not g.get("fallback")
            for p in g["params"]
            if id(p) not in owned
        ]
        self._warn_unsupported(model)
        self._warned: set[str] = set()
        #: steps skipped (empty batch, non-finite values) since construction.
        self.skipped_steps = 0
        #: layers a method leaves unpreconditioned on the current step (plain gradient).
        self._unpreconditioned: set[nn.Module] = set()
        if fused_backward and distributed.is_distributed():
            raise ValueError(
                "fused_backward=True is not available under torch.distributed: DDP reduces the "
                "weight gradients that the fused backward does not form"
            )
        self.fused_backward = bool(fused_backward)
        self._probes: dict[nn.Module, Tensor] = {}
        # The hooks ask the optimizer through a weak reference: a strong one (a bound method, a
        # lambda over self) would make optimizer -> capture -> hook -> optimizer a cycle, and a
        # dropped optimizer would keep recording until the cycle collector happened to run.
        self_ref = weakref.ref(self)

        def asks(*questions: str) -> Callable[[], bool]:
            def predicate() -> bool:
                opt = self_ref()
                return opt is not None and any(getattr(opt, q)() for q in questions)

            return predicate

        self.capture = Capture(
            model,
            record_inputs=asks("fuses", "wants_inputs"),
            record_outputs=asks("wants_outputs"),
            record_output_grads=asks("fuses", "wants_output_grads"),
            supported=self.supports,
        )
        self._skipper = (
            WeightGradientSkipper(
                [m for m in self.model_layers.values() if isinstance(m, nn.Linear)],
                active=asks("fuses"),
            )
            if self.fused_backward
            else None
        )
        self._warn_if_hooked_twice()

    @property
    def layers(self) -> dict[str, nn.Module]:
        """The preconditioned layers: supported layers whose weight is trainable now, by name."""
        return {n: m for n, m in self.model_layers.items() if m.weight.requires_grad}

    def _warn_if_hooked_twice(self) -> None:
        """Warn if another live foof optimizer hooks this model's layers; register this one."""
        others: set[str] = set()
        for module in self.model_layers.values():
            owners = _HOOKED_BY.setdefault(module, weakref.WeakSet())
            others.update(type(o).__name__ for o in owners if o is not self)
            owners.add(self)
        if others:
            warnings.warn(
                f"{type(self).__name__}: this model is already hooked by a live "
                f"{' and a '.join(sorted(others))} optimizer; both record statistics on every "
                "forward pass. close() the old optimizer (or build it in a `with` block) before "
                "building another on the same model",
                stacklevel=4,
            )

    # -- parameter groups ----------------------------------------------------------------------
    def _initial_groups(
        self,
        params: list[Tensor],
        owned: set[int],
        param_groups: Iterable[dict[str, Any]] | None,
        fallback_class: type[torch.optim.Optimizer] | None,
    ) -> list[dict[str, Any]]:
        """The groups at construction: the default one, the user's in order, the fallback's.

        Model parameters no user group names go to group 0 (parameters of supported layers, and
        with ``fallback=None`` all of them) or to a last group for the fallback optimizer.
        """
        in_model = {id(p) for p in params}
        taken: dict[int, int] = {}
        user = []
        for index, given in enumerate(param_groups or ()):
            where = f"param_groups[{index}]"
            group = _as_group(given, where)
            for param in group["params"]:
                if id(param) not in in_model:
                    raise ValueError(
                        f"{where} holds a parameter of shape {tuple(param.shape)} that is not in "
                        f"the model; {type(self).__name__} takes the model's parameters (add "
                        "others later with add_param_group)"
                    )
                if id(param) in taken:
                    raise ValueError(
                        f"parameter {self._param_names[id(param)]!r} is in param_groups"
                        f"[{taken[id(param)]}] and {where}; as in torch.optim, a parameter "
                        "belongs to one group"
                    )
                taken[id(param)] = index
            user.append(self._classify(group, owned, fallback_class, where))
        rest = [p for p in params if id(p) not in taken]
        default = [p for p in rest if fallback_class is None or id(p) in owned]
        plain = [p for p in rest if fallback_class is not None and id(p) not in owned]
        groups = ([{"params": default}] if default or not (user or plain) else []) + user
        if plain:
            groups.append({"params": plain, "fallback": fallback_class.__name__})
        return groups

    def _classify(
        self,
        group: dict[str, Any],
        owned: set[int],
        fallback_class: type[torch.optim.Optimizer] | None,
        where: str,
    ) -> dict[str, Any]:
        """Mark ``group`` as the fallback's when it holds only parameters outside every layer.

        Raises:
            ValueError: it mixes the two kinds (their options mean different things).
        """
        if fallback_class is None:
            return group
        plain = [p for p in group["params"] if id(p) not in owned]
        if plain and len(plain) < len(group["params"]):
            names = ", ".join(self._param_names.get(id(p), "?") for p in plain)
            raise ValueError(
                f"{where} mixes parameters of preconditioned layers with parameters that go to "
                f"the fallback optimizer {fallback_class.__name__} ({names}); pass them in "
                "separate groups, since the two optimizers take different options"
            )
        if plain:
            group["fallback"] = fallback_class.__name__
        return group

    def _build_fallback(
        self, groups: list[dict[str, Any]], options: dict[str, Any]
    ) -> torch.optim.Optimizer:
        """The fallback optimizer over ``groups`` (it keeps and fills in those very dicts)."""
        try:
            return self._fallback_class(groups, **options)
        except TypeError as error:
            raise TypeError(
                f"fallback {self._fallback_class.__name__} rejects fallback_options "
                f"{options!r}: {error}"
            ) from error

    def _link_fallback(self) -> None:
        """Make the fallback optimizer work on this optimizer's own groups and state.

        Shared, not copied: a scheduler or a hand edit of ``param_groups`` reaches it, and
        ``state_dict()`` holds its state under the same parameter ids as ``torch.optim`` would.
        Called again whenever ``load_state_dict`` replaces the groups and the state.
        """
        self._group_index = {
            id(p): i for i, group in enumerate(self.param_groups) for p in group["params"]
        }
        if self.fallback is not None:
            self.fallback.param_groups = [g for g in self.param_groups if g.get("fallback")]
            self.fallback.state = self.state

    def group_of(self, param: Tensor) -> dict[str, Any]:
        """The parameter group holding ``param``; a layer's is the group of its weight."""
        return self.param_groups[self._group_index[id(param)]]

    @property
    def schedule(self) -> dict[str, Any]:
        """The group holding the optimizer-wide options (:attr:`global_options`) and ``step``."""
        return self.param_groups[0]

    def _check_group_values(self, values: dict[str, Any], where: str) -> None:
        """Raise ``ValueError`` naming ``where`` for a bad per-group hyperparameter."""
        try:
            check_range("lr", values.get("lr", 0.0), 0.0)
            check_range("momentum", values.get("momentum", 0.0), 0.0, 1.0, high_open=True)
            check_range("weight_decay", values.get("weight_decay", 0.0), 0.0)
            check_range("damping", values.get("damping", 0.0), 0.0)
            check_range("ema_decay", values.get("ema_decay", 0.0), 0.0, 1.0, high_open=True)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, as in ``torch.optim``; it takes the optimizer's defaults for what it omits.

        Parameters outside the model's supported layers (a new nn.Parameter, a module outside
        the model) go to the fallback optimizer (its options, e.g. ``{"params": p, "lr":
        1e-4}``), or with ``fallback=None`` to a group with this optimizer's options and the
        plain SGD rule. The optimizer-wide options (:attr:`global_options`, ``step``) cannot
        be set per group.

        Raises:
            ValueError: a parameter already in a group (every model parameter is in one from
                the start: change that group's options instead); a parameter of a layer
                attached to the model after construction (its inputs are not hooked: build
                the optimizer again); an optimizer-wide option with a value of its own.
        """
        if not getattr(self, "_built", False):  # torch.optim's __init__ adds the initial groups
            if param_group.get("fallback"):
                self.param_groups.append(param_group)
            else:
                self._add_own_group(param_group, f"param group {len(self.param_groups)}")
            return
        where = f"param group {len(self.param_groups)}"
        group = _as_group(param_group, where)
        for param in group["params"]:
            if id(param) in self._group_index:
                index = self._group_index[id(param)]
                name = self._param_names.get(id(param), f"of shape {tuple(param.shape)}")
                raise ValueError(
                    f"parameter {name!r} is already in param group {index}; as in torch.optim "
                    f"a parameter belongs to one group: set its options there "
                    f"(opt.param_groups[{index}]['lr'] = ...) or pass param_groups= when "
                    "building the optimizer"
                )
            layer = self._unhooked_layer(param)
            if layer is not None:
                raise ValueError(
                    f"{where}: the parameter belongs to layer {layer!r}, attached to the model "
                    f"after {type(self).__name__} was built, so its inputs are not hooked; "
                    "build the optimizer again on the grown model"
                )
        if self._fallback_class is None:
            self._add_own_group(group, where)
            self.other_params += group["params"]
        else:
            group["fallback"] = self._fallback_class.__name__
            if self.fallback is None:
                self.fallback = self._build_fallback([group], self._fallback_options)
            else:
                self.fallback.add_param_group(group)
            self.param_groups.append(group)
        self._link_fallback()

    def _add_own_group(self, group: dict[str, Any], where: str) -> None:
        """``torch.optim``'s ``add_param_group``; optimizer-wide options stay in group 0."""
        for key in (*self.global_options, "step"):
            if key in group and group[key] != self.defaults.get(key):
                raise ValueError(
                    f"{where}: {key}={group[key]!r} cannot be set per group: {key} is "
                    f"optimizer-wide in {type(self).__name__} (one schedule of statistics and "
                    f"inversions for all layers); it is {self.defaults.get(key)!r} here, set "
                    "it in the constructor"
                )
        self._check_group_values(group, where)
        super().add_param_group(group)
        added = self.param_groups[-1]
        for key in (*self.global_options, "step"):
            added.pop(key, None)

    def _unhooked_layer(self, param: Tensor) -> str | None:
        """The name of a supported layer of the model owning ``param`` but not hooked, or None."""
        model = self._model()
        if model is None:
            return None
        for name, module in model.named_modules():
            if self.supports(module) and module not in self.model_layers.values():
                if any(p is param for p in module.parameters(recurse=False)):
                    return name
        return None

    def _warn_unsupported(self, model: nn.Module) -> None:
        """Warn once, naming them, where the parameters outside every layer's block go."""
        names = [
            name
            for name, p in model.named_parameters()
            if p.requires_grad
            and id(p) in {id(q) for q in self._fallback_params() + self.other_params}
        ]
        if not names:
            return
        if self.fallback is not None:
            groups = [i for i, g in enumerate(self.param_groups) if g.get("fallback")]
            first = self.param_groups[groups[0]]
            options = ", ".join(
                f"{k}={first[k]!r}" for k in ("lr", "betas", "weight_decay") if k in first
            )
            where = (
                f"go to the fallback optimizer {type(self.fallback).__name__} ({options}) in "
                f"param group(s) {', '.join(map(str, groups))}"
            )
        else:
            where = (
                "get a plain SGD(+momentum) update with their group's lr, momentum and weight "
                "decay (fallback=None)"
            )
        warnings.warn(
            f"{type(self).__name__}: {len(names)} parameter(s) belong to layers without "
            f"curvature support and {where}: {', '.join(names)}",
            stacklevel=5,
        )

    def _fallback_params(self) -> list[Tensor]:
        """The parameters of the fallback optimizer's groups."""
        return [p for g in self.param_groups if g.get("fallback") for p in g["params"]]

    # -- what a method needs captured on the coming step (asked at forward time) --------------
    @property
    def step_count(self) -> int:
        """Number of optimizer steps taken so far."""
        return self.schedule["step"]

    def fuses(self) -> bool:
        """Whether this step's backward skips the weight gradients (``fused_backward``)."""
        return self.fused_backward and not distributed.is_distributed()

    def wants_inputs(self) -> bool:
        """Whether this step's forward should record layer inputs ``A``."""
        return False

    def wants_outputs(self) -> bool:
        """Whether this step's forward should keep layer outputs for extra backward passes."""
        return False

    def wants_output_grads(self) -> bool:
        """Whether this step's backward should record output gradients ``E``."""
        return False

    # -- the method's own part ------------------------------------------------------------------
    def update_curvature(self, group: dict[str, Any]) -> None:
        """Update per-layer curvature from ``self.capture`` before the parameter update."""
        raise NotImplementedError

    def precondition(self, module: nn.Module, grad: Tensor, group: dict[str, Any]) -> Tensor:
        """Map the gradient matrix ``grad`` ``(out, in_dim)`` of ``module`` to its direction."""
        raise NotImplementedError

    def precondition_factors(
        self, module: nn.Module, output_grads: Tensor, rows: Tensor, group: dict[str, Any]
    ) -> Tensor:
        """The direction of a layer whose gradient was not formed: ``Ĝ = EᵀA`` is implicit.

        Args:
            module: the layer.
            output_grads: ``E`` ``(rows, out)``, gradients of the loss w.r.t. its outputs.
            rows: ``A`` ``(rows, in_dim)``, its input rows (bias column included).
            group: the parameter group.

        Returns:
            ``(out, in_dim)``. By default ``Ĝ`` is formed and passed to :meth:`precondition`;
            methods with a cheaper product on the factors override this.
        """
        return self.precondition(module, output_grads.T @ rows, group)

    def layer_rows(self, module: nn.Module) -> Tensor | None:
        """This step's input rows ``A`` ``(rows, in_dim)`` of ``module``, or None."""
        return self.capture.inputs(module)

    def recorded_factors(self, module: nn.Module) -> tuple[Tensor, Tensor] | None:
        """This step's recorded ``(E, A)`` of ``module``, paired row for row, or None.

        ``E`` ``(rows, out)`` and ``A`` ``(rows, in_dim)`` with ``EᵀA`` the layer's gradient
        ``[∇W, ∇b]`` of the backpropagated losses. None when no output gradient was recorded.
        """
        if not self.capture.records[module].output_grads:
            return None
        if not self.capture.calls_pair_up(module):
            # a forward call not backpropagated, or backpropagated twice: pair call by call
            return self.capture.paired_rows(module)
        rows = self.layer_rows(module)
        if rows is None:
            return None
        return self.capture.output_grads(module), rows

    def gradient_factors(self, module: nn.Module) -> tuple[Tensor, Tensor] | None:
        """``(E, A)`` of a layer whose weight gradient the fused backward skipped, else None.

        See :meth:`recorded_factors`. None when the layer has a formed ``weight.grad`` or took no
        part in this step's loss.
        """
        if not self.fused_backward or module.weight.grad is not None:
            return None
        return self.recorded_factors(module)

    def gradient_is_product(
        self, module: nn.Module, grad: Tensor, output_grads: Tensor, rows: Tensor
    ) -> bool:
        """Whether the formed gradient ``grad`` ``(out, in_dim)`` really is ``EᵀA``.

        A gradient changed after backward (clipping, an L2 term added outside the layer output,
        a second loss that was not recorded) is not; it is detected by comparing ``Ĝ r`` with
        ``Eᵀ(A r)`` for a fixed random ``r`` (``out·in`` flops, a fraction of any product).
        ``output_grads`` and ``rows`` are in the factors' dtype.
        """
        dtype = rows.dtype
        in_dim, out = rows.shape[1], output_grads.shape[1]
        probe = self._probes.get(module)
        if probe is None or probe.shape[0] != in_dim or probe.dtype != dtype:
            generator = torch.Generator(device="cpu").manual_seed(in_dim * 7919 + out)
            probe = torch.randn(in_dim, generator=generator, dtype=dtype).to(rows.device)
            self._probes[module] = probe
        direct = grad.to(dtype) @ probe
        factored = output_grads.T @ (rows @ probe)
        tolerance = 1e-4 if dtype == torch.float32 else 1e-10
        return torch.allclose(
            direct, factored, rtol=tolerance, atol=tolerance * float(direct.abs().max())
        )

    # -- the shared part --------------------------------------------------------------------
    def backward(self, loss: Tensor, output: Tensor | None = None) -> None:
        """Backward pass of the uniform training step; here just ``loss.backward()``.

        Methods that need extra passes (an MC-sampled Fisher) override this; the parameter
        gradients are always those of ``loss`` alone.
        """
        loss.backward()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients, as ``torch.optim`` does; the captured statistics are kept.

        Statistics belong to the training forward passes since the last :meth:`step` (which
        clears them), not since the last ``zero_grad``: so ``zero_grad`` may come before the
        forward pass or between forward and backward, and gradient accumulation over several
        micro-batches takes the statistics of all of them. Precisely, the records are
        dropped at the first recorded forward pass after a ``zero_grad`` (the usual loop); the
        Fisher's pending output gradients (KFAC, natural gradients) come from a backward pass,
        whose gradients ``zero_grad`` discards, so they are dropped at once.
        """
        super().zero_grad(set_to_none=set_to_none)
        self.capture.mark()
        if self.sampler is not None:
            self.sampler.clear()

    def clear_records(self) -> None:
        """Forget the captured statistics and the Fisher's pending gradients (done by ``step``)."""
        self.capture.clear()
        if self.sampler is not None:
            self.sampler.clear()

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim``'s state dict, plus the Fisher sampler's generator if there is one."""
        state = super().state_dict()
        if self.sampler is not None:
            state["fisher_sampler"] = self.sampler.state_dict()
        state["foof"] = {
            "optimizer": type(self).__name__,
            "layers": self._layer_signature(),
            "fallback": None if self.fallback is None else type(self.fallback).__name__,
        }
        return state

    def _layer_signature(self) -> dict[str, list[int]]:
        """Each supported layer's gradient-matrix shape ``[out, in_dim]``, by name."""
        signature = {}
        for name, module in self.model_layers.items():
            signature[name] = [layer_out_dim(module), layer_in_dim(module)]
        return signature

    def _check_compatible(self, state_dict: dict[str, Any]) -> None:
        """Refuse, with a message that says what differs, a checkpoint of another setup.

        Layers are matched in order and shape: a model saved inside a wrapper (DDP's
        ``module.``, ``torch.compile``'s ``_orig_mod.``, any container) loads into the bare
        model and back, since its parameters come in the same order.
        """
        meta = state_dict.get("foof") if isinstance(state_dict, dict) else None
        if not isinstance(meta, dict):
            groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
            held = ""
            if isinstance(groups, list) and groups and isinstance(groups[0], dict):
                held = "; its parameter group holds " + ", ".join(
                    sorted(str(k) for k in groups[0] if k != "params")
                )
            raise ValueError(
                f"this is not a foof optimizer state (no 'foof' entry{held}): "
                f"{type(self).__name__}.load_state_dict takes what a {type(self).__name__}'s "
                "state_dict() returned; nothing was loaded"
            )
        if meta["optimizer"] != type(self).__name__:
            raise ValueError(
                f"this checkpoint is from a {meta['optimizer']} optimizer, not "
                f"{type(self).__name__}; build the optimizer the checkpoint was saved from"
            )
        ours = self._layer_signature()
        theirs = {name: list(shape) for name, shape in meta["layers"].items()}
        if list(ours.values()) != list(theirs.values()):
            if set(ours) == set(theirs):
                differences = [
                    f"layer {name!r}: checkpoint {theirs[name]}, model {ours[name]}"
                    for name in ours
                    if ours[name] != theirs[name]
                ]
            else:  # named differently as well: say which position differs
                differences = [
                    f"layer #{i}: checkpoint {t[0]!r} {t[1]}, model {o[0]!r} {o[1]}"
                    for i, (t, o) in enumerate(
                        itertools.zip_longest(theirs.items(), ours.items(), fillvalue=("-", []))
                    )
                    if t[1] != o[1]
                ]
            raise ValueError(
                "this checkpoint was saved for a different model (layer [out, in_dim] shapes "
                "differ): " + "; ".join(differences[:5]) + ("; ..." if len(differences) > 5 else "")
            )
        self._check_groups_match(state_dict, meta)

    def _check_groups_match(self, state_dict: dict[str, Any], meta: dict[str, Any]) -> None:
        """Refuse a checkpoint whose parameter groups are not this optimizer's, saying why.

        A checkpoint from before the fallback optimizer existed (no ``fallback`` entry) had one
        group holding every parameter; it loads into ``fallback=None`` with one group.
        """
        theirs = [(len(g["params"]), g.get("fallback")) for g in state_dict.get("param_groups", [])]
        ours = [(len(g["params"]), g.get("fallback")) for g in self.param_groups]
        if theirs == ours:
            return
        ours_fallback = None if self.fallback is None else type(self.fallback).__name__
        hint = ""
        if "fallback" not in meta:
            hint = (
                "; it was saved before the fallback optimizer existed, with one group and plain "
                f"SGD for every parameter outside a layer: build {type(self).__name__} with "
                "fallback=None to resume it"
            )
        elif meta["fallback"] != ours_fallback:
            hint = (
                f"; it was saved with fallback={meta['fallback']!r}, this optimizer has "
                f"{ours_fallback!r}"
            )
        raise ValueError(
            "this checkpoint's parameter groups differ from this optimizer's ([parameters, "
            f"fallback] per group: checkpoint {[list(t) for t in theirs]}, optimizer "
            f"{[list(o) for o in ours]}){hint}; nothing was loaded"
        )

    def layer_items(self) -> Iterator[tuple[str, nn.Module, dict[str, Any]]]:
        """``(name, module, state)`` per preconditioned layer; state lives under the weight."""
        for name, module in self.layers.items():
            yield name, module, self.state[module.weight]

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Take one optimization step (see the class docstring for the update).

        Raises:
            RuntimeError: no parameter has a gradient (no backward since the last
                ``zero_grad()``); nothing is changed.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        schedule = self.schedule
        self._check_backward_ran(schedule)
        skip = self._skip_reason(loss)
        if skip is not None:
            self._skip_step(*skip, schedule)
            return loss
        self._unpreconditioned = set()
        # Curvature algebra stays in the factors' precision even if step() runs under autocast.
        with torch.autocast(device_type=schedule["params"][0].device.type, enabled=False):
            self.update_curvature(schedule)
            for _, module, state in self.layer_items():
                group = self.group_of(module.weight)
                grad = gradient_matrix(module)
                factors = None if grad is not None else self.gradient_factors(module)
                if grad is None and factors is None:
                    continue
                if module in self._unpreconditioned:  # no curvature yet: the plain gradient
                    direction = grad if grad is not None else factors[0].T @ factors[1]
                    direction = direction.to(module.weight.dtype)
                elif grad is not None:
                    direction = self.precondition(module, grad, group)
                else:
                    direction = self.precondition_factors(module, *factors, group)
                self._apply(state, *weight_layout(module, direction), group)
            for param in self.plain_params():
                if param.grad is not None:
                    self._apply(self.state[param], [param], param.grad, self.group_of(param))
        if self.fallback is not None:
            self.fallback.step()
        schedule["step"] += 1
        self.clear_records()
        return loss

    def plain_params(self) -> list[Tensor]:
        """Parameters updated by plain SGD(+momentum) this step, in their own group.

        Those of unsupported layers when there is no fallback optimizer (:attr:`other_params`),
        and the biases of supported layers whose weight is frozen.
        """
        biases = [
            layer_bias(m)
            for m in self.model_layers.values()
            if not m.weight.requires_grad and layer_bias(m) is not None
        ]
        return self.other_params + biases

    def _check_backward_ran(self, group: dict[str, Any]) -> None:
        """Raise before anything changes if no parameter has a gradient to step with."""
        if any(p.grad is not None for g in self.param_groups for p in g["params"]):
            return
        if self.fused_backward and any(
            self.capture.records[m].output_grads for m in self.layers.values()
        ):
            return  # the fused backward forms no weight gradient, E and A stand for it
        raise RuntimeError(
            f"{type(self).__name__}.step(): no parameter has a gradient. Call loss.backward() "
            "(opt.backward(loss, output) for KFAC and natural gradients) before step(), or "
            f"pass a closure that does; nothing was changed (step counter {group['step']})"
        )

    def batch_is_empty(self) -> bool:
        """Whether this step's forward passes had inputs, all of them empty (batch size 0)."""
        calls = empty = 0
        for module in self.model_layers.values():
            record = self.capture.records[module]
            calls += record.calls
            empty += record.empty_calls
        return calls > 0 and empty == calls

    def _skip_reason(self, loss: Tensor | None) -> tuple[str, bool] | None:
        """Why this step must change nothing, and whether it is a non-finite value; or None."""
        reason, nonfinite = None, False
        if self.batch_is_empty():
            # mean losses of an empty batch are NaN and its gradients 0: neither is a step
            reason = "the batch is empty (no input rows reached any layer)"
        else:
            fault = self._first_nonfinite(loss)
            if fault is not None:
                reason, nonfinite = f"{fault} is not finite", True
        # Under torch.distributed every rank must skip (or raise on) the same steps, or a rank
        # that skips alone would leave the others waiting in the next statistics reduction.
        local = 2 if nonfinite else int(reason is not None)
        worst = distributed.max_over_ranks(local, like=self.schedule["params"][0])
        if worst == local:
            return None if reason is None else (reason, nonfinite)
        if worst == 2:
            return "a loss, gradient or statistic on another rank is not finite", True
        return "the batch is empty on another rank", False

    def find_nonfinite(self, loss: Tensor | None = None) -> str | None:
        """Name the first non-finite quantity this step would use, or None if all are finite.

        Checked: the closure's loss, every parameter gradient, the recorded layer inputs and the
        Fisher's pending output gradients, so that nothing non-finite reaches a statistic.
        Under ``torch.distributed`` a fault on any rank is one on every rank.
        """
        fault = self._first_nonfinite(loss)
        like = self.schedule["params"][0]
        if distributed.any_rank(fault is not None, like=like) and fault is None:
            fault = "a loss, gradient or statistic on another rank"
        return fault

    def _first_nonfinite(self, loss: Tensor | None) -> str | None:
        """:meth:`find_nonfinite` on this process alone."""
        named: list[tuple[str, Tensor]] = []
        if loss is not None:
            named.append(("the loss", loss.detach()))
        for name, module in self.layers.items():
            for kind, param in (("weight", module.weight), ("bias", layer_bias(module))):
                if param is not None and param.grad is not None:
                    named.append((f"the {kind} gradient of layer {name!r}", param.grad))
            for inputs in self.capture.records[module].inputs:
                named.append((f"the inputs of layer {name!r}", inputs))
            if self.fused_backward and module.weight.grad is None:
                for grads in self.capture.records[module].output_grads:
                    named.append((f"the output gradients of layer {name!r}", grads))
        for index, param in enumerate(self.plain_params() + self._fallback_params()):
            if param.grad is not None:
                name = self._param_names.get(id(param), f"#{index}")
                named.append((f"the gradient of unsupported parameter {name!r}", param.grad))
        if self.sampler is not None and self.sampler.pending is not None:
            names = {m: n for n, m in self.layers.items()}
            for module, grads in self.sampler.pending[0].items():
                named.append((f"the Fisher output gradients of layer {names.get(module)!r}", grads))
        fault = None
        if named:
            # A sum is non-finite whenever one of its terms is, and costs one read of the
            # tensor (isfinite + all also writes a mask): the cheap test for the healthy case,
            # with one synchronisation. A finite tensor whose sum overflows only sends us to the
            # exact elementwise test, which then clears it.
            sums = torch.stack([t.sum(dtype=torch.float32) for _, t in named])
            if not bool(sums.isfinite().all()):
                finite = torch.stack([torch.isfinite(t).all() for _, t in named])
                if not bool(finite.all()):
                    fault = named[int((~finite).nonzero()[0])][0]
        return fault

    def _skip_step(self, reason: str, nonfinite: bool, group: dict[str, Any]) -> None:
        """Leave parameters, momentum, statistics and the step counter as they were.

        ``nonfinite="raise"`` raises for a non-finite value; an empty batch is always skipped.
        """
        self.clear_records()
        message = (
            f"{type(self).__name__}: step {group['step']} skipped, {reason} "
            "(parameters, momentum and statistics left unchanged)"
        )
        if group["nonfinite"] == "raise" and nonfinite:
            raise NonFiniteError(message)
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(
                message + "; further skips for this cause are silent", RuntimeWarning, stacklevel=3
            )
        self.skipped_steps += 1

    def _apply(
        self, state: dict[str, Any], params: list, direction: Tensor, group: dict[str, Any]
    ) -> None:
        """Momentum, decoupled weight decay and the update of the parameters in ``params``.

        ``direction`` is the joint ``[W, b]`` matrix for a layer (split back by column), or the
        parameter-shaped gradient for a plain parameter. ``momentum`` is that of ``group`` (the
        weight's: the buffer is joint); ``lr`` and ``weight_decay`` are each parameter's own
        group's, so a bias may sit in a group without weight decay, as with torch.optim.
        """
        momentum = group["momentum"]
        if momentum > 0:
            buffer = state.get("momentum_buffer")
            if buffer is None:
                buffer = state["momentum_buffer"] = direction.clone()
            else:
                buffer.mul_(momentum).add_(direction)
            direction = buffer
        if len(params) == 2 and params[1] is not None:
            pairs = [(params[0], direction[:, :-1]), (params[1], direction[:, -1])]
        else:
            pairs = [(params[0], direction)]
        for param, param_direction in pairs:
            if not param.requires_grad:
                continue
            own = self.group_of(param)
            lr, weight_decay = own["lr"], own["weight_decay"]
            if weight_decay:
                param.mul_(1.0 - lr * weight_decay)
            param.add_(param_direction.reshape(param.shape).to(param.dtype), alpha=-lr)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`, keeping curvature factors in their saved dtype.

        ``torch.optim`` casts state to each parameter's dtype; factors of a bf16 model are
        float32 by design, so they are put back as they were saved.
        """
        state_dict = dict(state_dict)
        self._check_compatible(state_dict)
        state_dict.pop("foof", None)
        sampler_state = state_dict.pop("fisher_sampler", None)
        if self.sampler is not None and sampler_state is not None:
            self.sampler.load_state_dict(sampler_state)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        saved = {
            i: {k: v for k, v in state_dict["state"].get(i, {}).items() if k in self.factor_keys}
            for i in ids
        }
        super().load_state_dict(state_dict)
        self._link_fallback()
        params = [p for g in self.param_groups for p in g["params"]]
        for position, i in enumerate(ids):
            for key, value in saved[i].items():
                if isinstance(value, Tensor):
                    value = value.to(device=params[position].device, copy=True)
                self.state[params[position]][key] = value

    def close(self) -> None:
        """Remove the hooks from the model. The optimizer can no longer capture afterwards."""
        self.capture.close()
        if self._skipper is not None:
            self._skipper.close()
        for module in self.model_layers.values():
            owners = _HOOKED_BY.get(module)
            if owners is not None:
                owners.discard(self)

    def __enter__(self) -> CurvatureOptimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
