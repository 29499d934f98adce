"""What the benchmark times: workloads (model, batch, loss) and methods (optimizer + settings).

A :class:`Method` builds a :class:`Stepper` for a model; every stepper runs one training step
per call. foof's own optimizers and ``torch.optim``'s run the uniform step of
:mod:`foof.train`::

    opt.zero_grad(); out = model(x); loss = loss_fn(out, y); backward(opt, loss, out); opt.step()

Peer libraries run their own documented step (ASDL: ``GradientMaker.forward_and_backward``
followed by ``torch.optim.SGD.step``), with the same model, data, loss and schedule. A peer
that is not importable gives a :class:`PeerUnavailableError` and is reported as "not installed".
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from foof.models import TASKS, build_model
from foof.optim.registry import backward, build_optimizer
from foof.train import DEFAULT_HYPERPARAMETERS, cross_entropy, reconstruction_error

BASELINE = "sgd"
"""Key of the method every ratio is taken to: SGD with momentum 0.9."""

LIKELIHOODS = {"classification": "categorical", "reconstruction": "gaussian"}
"""The likelihood KFAC and natural gradients use for each task (as :mod:`foof.train`)."""

TIMING_LR_SCALE = 0.01
"""Learning rates of the per-step timings, as a fraction of the training values (see
:attr:`Workload.lr_scale`)."""

EMA_DECAY = 0.95
"""Decay of the curvature moving averages, the default of FOOF and KFAC (ASDL gets ``1 − m``)."""


class PeerUnavailableError(RuntimeError):
    """A peer library is not importable; the message says which and why."""


class Stepper(Protocol):
    """One method on one model: takes training steps and knows its extra state."""

    model: nn.Module

    def step(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """Take one training step on the batch; returns the (detached) loss."""

    def state_roots(self) -> list[Any]:
        """Objects holding the method's persistent state (searched for tensors)."""

    def close(self) -> None:
        """Release hooks and references."""


@dataclass(frozen=True)
class Workload:
    """A model and batch size to time every method on.

    Attributes:
        key: short name used in tables and JSON, e.g. ``"mlp-b100"``.
        title: a human description for the table heading.
        model: a key of :data:`foof.models.MODELS`.
        batch_size: rows per step ``B``.
        methods: the methods timed on this workload, the baseline first.
        model_options: keyword arguments of the model factory.
        input_shape: shape of one input (the paper's models take 28x28 images).
        num_classes: labels of a classification model.
    """

    key: str
    title: str
    model: str
    batch_size: int
    methods: tuple[Method, ...]
    model_options: Mapping[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] = (1, 28, 28)
    num_classes: int = 10
    lr_scale: float = 1.0
    steps: int | None = None

    @property
    def task(self) -> str:
        """``"classification"`` or ``"reconstruction"`` (from :data:`foof.models.TASKS`)."""
        return TASKS[self.model]

    @property
    def likelihood(self) -> str:
        """The likelihood of the task's loss, for KFAC, natural gradients and peers."""
        return LIKELIHOODS[self.task]

    def loss_fn(self) -> Callable[[Tensor, Tensor], Tensor]:
        """The training loss of :mod:`foof.train` for this task (a mean over the batch)."""
        return cross_entropy if self.task == "classification" else reconstruction_error

    def build_model(self, device: torch.device) -> nn.Module:
        """A freshly initialised model on ``device`` (init from torch's global RNG)."""
        return build_model(self.model, **dict(self.model_options)).to(device)

    def make_batches(
        self, count: int, device: torch.device, seed: int = 0
    ) -> list[tuple[Tensor, Tensor]]:
        """``count`` fixed random batches ``(x, target)``; the target of an autoencoder is ``x``.

        Per-step time does not depend on the pixel values, so standard-normal inputs (the scale
        of the normalised images) and uniform labels stand in for the data set.
        """
        generator = torch.Generator().manual_seed(seed)
        batches = []
        for _ in range(count):
            x = torch.randn(self.batch_size, *self.input_shape, generator=generator)
            if self.task == "classification":
                target = torch.randint(0, self.num_classes, (self.batch_size,), generator=generator)
            else:
                target = x.flatten(1)
            batches.append((x.to(device), target.to(device)))
        return batches


@dataclass(frozen=True)
class Method:
    """An optimizer with its settings, as one row of the benchmark.

    Attributes:
        key: unique short name, e.g. ``"foof-100-s10"``.
        label: what the table shows, e.g. ``"FOOF (inv_every=100, stats_steps=10)"``.
        optimizer: the registry name (``"foof"``, ...) or the peer's name (``"asdl-kfac"``).
        settings: its hyperparameters as passed (for the JSON record).
        period: the step pattern's period (``inv_every``): timings cover whole periods so
            that the mean is the amortised cost.
        build: makes the :class:`Stepper` for a model and workload; may raise
            :class:`PeerUnavailableError`.
        peer: the peer package's import name, ``None`` for foof and ``torch.optim``.
    """

    key: str
    label: str
    optimizer: str
    settings: Mapping[str, Any]
    period: int
    build: Callable[[nn.Module, Workload], Stepper] = field(repr=False, compare=False)
    peer: str | None = None


# -- foof and torch.optim: the uniform step ------------------------------------------------


class UniformStepper:
    """A model and an optimizer from :func:`foof.build_optimizer`, stepped as in ``foof.train``.

    Args:
        model: the network (already on its device).
        optimizer: its optimizer.
        loss_fn: the task's loss.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn

    def step(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """``zero_grad; forward; loss; backward(opt, loss, out); step``."""
        self.optimizer.zero_grad()
        output = self.model(inputs)
        loss = self.loss_fn(output, targets)
        backward(self.optimizer, loss, output)
        self.optimizer.step()
        return loss.detach()

    def state_roots(self) -> list[Any]:
        """The optimizer's ``state`` (factors, inverses, momentum buffers, stored Fisher data)."""
        return [self.optimizer.state]

    def close(self) -> None:
        """Remove a curvature optimizer's hooks."""
        close = getattr(self.optimizer, "close", None)
        if close is not None:
            close()


def registry_method(
    key: str, label: str, optimizer: str, period: int = 1, **settings: Any
) -> Method:
    """A method built by :func:`foof.build_optimizer` with the paper's Fashion-MNIST defaults.

    ``settings`` override :data:`foof.train.DEFAULT_HYPERPARAMETERS`; KFAC and natural
    gradients get the workload's likelihood.
    """
    resolved = {**DEFAULT_HYPERPARAMETERS.get(optimizer, {}), **settings}

    def build(model: nn.Module, workload: Workload) -> Stepper:
        kwargs = dict(resolved)
        kwargs["lr"] = kwargs["lr"] * workload.lr_scale
        if optimizer in ("kfac", "natural"):
            kwargs["likelihood"] = workload.likelihood
            kwargs.setdefault("seed", 0)
        return UniformStepper(
            model, build_optimizer(optimizer, model, **kwargs), workload.loss_fn()
        )

    return Method(key, label, optimizer, resolved, period, build)


def sgd() -> Method:
    """The baseline: SGD with momentum 0.9 (lr 0.01)."""
    return registry_method(BASELINE, "SGD+momentum", "sgd")


def adam() -> Method:
    """Adam (lr 1e-4)."""
    return registry_method("adam", "Adam", "adam")


FUSED_SUFFIX = ("-fused", ", fused backward")
"""Key and label suffixes of a method run with ``fused_backward=True``."""


def foof(inv_every: int = 1, stats_steps: int | None = None, fused: bool = False) -> Method:
    """FOOF with the given amortisation (lr 30, damping 100, ema_decay 0.95)."""
    key, label = _amortised("foof", "FOOF", inv_every, stats_steps, fused)
    return registry_method(
        key,
        label,
        "foof",
        inv_every,
        inv_every=inv_every,
        stats_steps=stats_steps,
        **_fused_option(fused),
    )


def kfac(
    damping_mode: str = "heuristic",
    inv_every: int = 1,
    stats_steps: int | None = None,
    fused: bool = False,
) -> Method:
    """KFAC with the MC Fisher (lr 0.3, damping 1; standard damping by eigendecomposition)."""
    key, label = _amortised(
        f"kfac-{damping_mode}", f"KFAC {damping_mode}", inv_every, stats_steps, fused
    )
    return registry_method(
        key,
        label,
        "kfac",
        inv_every,
        damping_mode=damping_mode,
        inv_every=inv_every,
        stats_steps=stats_steps,
        **_fused_option(fused),
    )


def natural(fisher: str = "mc", block_diagonal: bool = False, fused: bool = False) -> Method:
    """Exact subsampled natural gradient through Woodbury (lr 1e-5, damping 1e-4)."""
    key = f"natural-{'block-' if block_diagonal else ''}{fisher}"
    label = f"NaturalGradient {fisher}" + (", block-diagonal" if block_diagonal else "")
    if fused:
        key, label = key + FUSED_SUFFIX[0], label + FUSED_SUFFIX[1]
    return registry_method(
        key,
        label,
        "natural",
        fisher=fisher,
        block_diagonal=block_diagonal,
        **_fused_option(fused),
    )


def _fused_option(fused: bool) -> dict[str, Any]:
    return {"fused_backward": True} if fused else {}


def _amortised(
    key: str, label: str, inv_every: int, stats_steps: int | None, fused: bool = False
) -> tuple[str, str]:
    key = f"{key}-{inv_every}" + (f"-s{stats_steps}" if stats_steps is not None else "")
    label = f"{label} (inv_every={inv_every}" + (
        f", stats_steps={stats_steps}" if stats_steps is not None else ""
    )
    if fused:
        return key + FUSED_SUFFIX[0], label + FUSED_SUFFIX[1] + ")"
    return key, label + ")"


# -- peers -------------------------------------------------------------------------------


def import_peer(module: str, package: str) -> Any:
    """Import a peer library or raise :class:`PeerUnavailableError` naming the pip package."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise PeerUnavailableError(f"not installed (pip install {package}): {error}") from error


def peer_version(module: str, package: str) -> str | None:
    """The installed version of a peer's pip package (``None`` if it is not importable)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return None
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class AsdlStepper:
    """ASDL's ``GradientMaker`` with ``torch.optim.SGD`` applying its preconditioned gradient.

    Args:
        model: the network.
        maker: an ASDL gradient maker for ``model``.
        lr: learning rate of the SGD step.
        loss_fn: the task's loss, passed to ``setup_loss_call``.
    """

    def __init__(
        self,
        model: nn.Module,
        maker: Any,
        lr: float,
        loss_fn: Callable[..., Tensor],
    ) -> None:
        self.model = model
        self.maker = maker
        self.loss_fn = loss_fn
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr)

    def step(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """ASDL's step: set up the calls, ``forward_and_backward()``, then ``SGD.step()``."""
        self.optimizer.zero_grad()
        dummy_output = self.maker.setup_model_call(self.model, inputs)
        self.maker.setup_loss_call(self.loss_fn, dummy_output, targets)
        _, loss = self.maker.forward_and_backward()
        self.optimizer.step()
        return loss.detach()

    def state_roots(self) -> list[Any]:
        """ASDL keeps its Fisher factors and inverses as attributes of the model's modules."""
        return [self.maker.__dict__, *(_module_attributes(m) for m in self.model.modules())]

    def close(self) -> None:
        """Drop the references ASDL keeps to the last batch."""
        self.maker = None


def _module_attributes(module: nn.Module) -> dict[str, Any]:
    """Plain attributes of a module (not parameters, buffers, submodules or hooks)."""
    return {k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training"}


def asdl_kfac(inv_every: int = 1, curvature_every: int = 1) -> Method:
    """ASDL's KFAC (``KfacGradientMaker``, MC Fisher, heuristic π damping as foof's KFAC).

    Args:
        inv_every: ``preconditioner_upd_interval``.
        curvature_every: ``curvature_upd_interval`` (ASDL has no ``stats_steps`` window: with
            ``inv_every=T`` and ``curvature_every=T/S`` it updates the factors as often, but
            spread over the period).
    """
    settings = {
        **DEFAULT_HYPERPARAMETERS["kfac"],
        "inv_every": inv_every,
        "curvature_every": curvature_every,
        "ema_decay": EMA_DECAY,
        "fisher": "mc",
    }
    key = f"asdl-kfac-{inv_every}" + (f"-c{curvature_every}" if curvature_every > 1 else "")
    label = f"ASDL KFAC (inv_every={inv_every}" + (
        f", curvature every {curvature_every})" if curvature_every > 1 else ")"
    )

    def build(model: nn.Module, workload: Workload) -> Stepper:
        asdl = import_asdl(model)
        config = asdl.PreconditioningConfig(
            data_size=workload.batch_size,
            damping=settings["damping"],
            preconditioner_upd_interval=inv_every,
            curvature_upd_interval=curvature_every,
            ema_decay=1.0 - EMA_DECAY,
        )
        loss_type = asdl.LOSS_CROSS_ENTROPY if workload.task == "classification" else asdl.LOSS_MSE
        maker = asdl.KfacGradientMaker(
            model, config, fisher_type=asdl.FISHER_MC, loss_type=loss_type, seed=0
        )
        return AsdlStepper(model, maker, settings["lr"] * workload.lr_scale, _peer_loss(workload))

    return Method(key, label, "asdl-kfac", settings, inv_every, build, peer="asdl")


def asdl_smw_empirical() -> Method:
    """ASDL's empirical-Fisher natural gradient by Sherman-Morrison-Woodbury (classification)."""
    settings = {**DEFAULT_HYPERPARAMETERS["natural"], "fisher": "empirical"}

    def build(model: nn.Module, workload: Workload) -> Stepper:
        asdl = import_asdl(model)
        if workload.task != "classification":
            raise PeerUnavailableError("not applicable: ASDL's SMW maker takes a per-sample loss")
        config = asdl.SmwEmpNaturalGradientConfig(
            data_size=workload.batch_size, damping=settings["damping"]
        )
        maker = asdl.SmwEmpNaturalGradientMaker(model, config)
        lr = settings["lr"] * workload.lr_scale
        return AsdlStepper(model, maker, lr, nn.functional.cross_entropy)

    return Method(
        "asdl-smw-empirical",
        "ASDL SMW natural gradient (empirical)",
        "asdl-smw",
        settings,
        1,
        build,
        peer="asdl",
    )


def import_asdl(model: nn.Module) -> Any:
    """Import ASDL (``pip install asdfghjkl``), ready to run on the model's device.

    ASDL wraps its curvature code in ``torch.cuda.nvtx.range``, which raises on a CPU-only
    build of torch; for a model on the CPU its modules get a no-op ``nvtx`` instead (NVTX
    ranges only annotate GPU traces, so this changes no computation).
    """
    asdl = import_peer("asdl", "asdfghjkl")
    if next(model.parameters()).device.type != "cuda":
        for name in (
            "asdl.utils",
            "asdl.operations.operation",
            "asdl.precondition.natural_gradient",
        ):
            module = importlib.import_module(name)
            if getattr(module, "nvtx", None) is not _NoNvtx:
                module.nvtx = _NoNvtx
    return asdl


class _NoNvtx:
    """Stands in for ``torch.cuda.nvtx`` in ASDL's modules on CPU (see :func:`import_asdl`)."""

    @staticmethod
    def range(*args: Any, **kwargs: Any) -> contextlib.nullcontext:
        return contextlib.nullcontext()


def gaussian_loss(output: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """``½‖output_i − target_i‖²`` per sample, reduced as ASDL asks (``"mean"`` is foof's loss)."""
    per_sample = 0.5 * (output - target).square().sum(dim=1)
    if reduction == "none":
        return per_sample
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


def _peer_loss(workload: Workload) -> Callable[..., Tensor]:
    # ASDL calls the loss with a `reduction` keyword, which it checks for in the signature.
    if workload.task == "classification":
        return nn.functional.cross_entropy
    return gaussian_loss


# -- the workloads of issue 5 ---------------------------------------------------------------


def mlp_methods(peers: bool = True) -> tuple[Method, ...]:
    """Every method on the paper's MLP: amortised at 1 and 100, natural gradients, peers."""
    methods = [
        sgd(),
        adam(),
        foof(1),
        foof(100),
        foof(100, 10),
        kfac("heuristic", 1),
        kfac("heuristic", 100),
        kfac("standard", 1),
        kfac("standard", 100),
        natural("mc"),
        natural("full"),
        natural("mc", block_diagonal=True),
        natural("empirical"),
        foof(1, fused=True),
        foof(100, fused=True),
        foof(100, 10, fused=True),
        kfac("heuristic", 1, fused=True),
        kfac("heuristic", 100, fused=True),
        natural("mc", fused=True),
    ]
    if peers:
        methods += [asdl_kfac(1), asdl_kfac(100), asdl_smw_empirical()]
    return tuple(methods)


def autoencoder_methods(peers: bool = True) -> tuple[Method, ...]:
    """The autoencoder at ``inv_every=10`` (no full Fisher: 784 outputs x B columns)."""
    methods = [
        sgd(),
        adam(),
        foof(10),
        kfac("heuristic", 10),
        kfac("standard", 10),
        natural("mc"),
        natural("mc", block_diagonal=True),
    ]
    if peers:
        methods.append(asdl_kfac(10))
    return tuple(methods)


def cnn_methods(peers: bool = True) -> tuple[Method, ...]:
    """The small CNN, amortised as in paper Fig. 5A (500 / 10), plus the every-step variants."""
    methods = [
        sgd(),
        adam(),
        foof(500, 10),
        kfac("heuristic", 500, 10),
        foof(1),
        kfac("heuristic", 1),
        natural("mc"),
        foof(500, 10, fused=True),
        kfac("heuristic", 500, 10, fused=True),
    ]
    if peers:
        methods += [asdl_kfac(500, 50), asdl_kfac(1)]
    return tuple(methods)


def default_workloads(quick: bool = False, peers: bool = True) -> tuple[Workload, ...]:
    """The workloads of issue 5, cheapest first; ``quick`` keeps only the MLP at batch 100."""
    mlp_title = "paper's MLP 784-1000-1000-1000-10 (no biases)"
    scale = {"lr_scale": TIMING_LR_SCALE}
    workloads = [
        Workload("mlp-b100", f"{mlp_title}, batch 100", "mlp", 100, mlp_methods(peers), **scale),
        Workload(
            "autoencoder-b1000",
            "autoencoder 784-1000-500-250-30-250-500-1000-784, batch 1000, inv_every=10",
            "autoencoder",
            1000,
            autoencoder_methods(peers),
            steps=30,
            **scale,
        ),
        Workload(
            "cnn-b100",
            "small CNN (2 conv + 2 linear), batch 100, amortised inv_every=500, stats_steps=10",
            "cnn",
            100,
            cnn_methods(peers),
            **scale,
        ),
        Workload("mlp-b1000", f"{mlp_title}, batch 1000", "mlp", 1000, mlp_methods(peers), **scale),
    ]
    if quick:
        workloads = [w for w in workloads if w.key == "mlp-b100"]
    return tuple(workloads)


def iter_methods(workloads: tuple[Workload, ...]) -> Iterator[tuple[Workload, Method]]:
    """Every ``(workload, method)`` pair."""
    for workload in workloads:
        for method in workload.methods:
            yield workload, method
