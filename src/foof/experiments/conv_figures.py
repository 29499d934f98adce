"""The paper's convolutional figures: Fig. 5 and App. J.12, J.14, J.16, J.17/J.18.

``standard`` mode is the paper's setting (App. D.6, D.8) on the real datasets, for a user with a
GPU and the data (``foof reproduce 5WRN J12 J14 J16 J17 --mode standard --data-root DIR
--device cuda``): the Wide ResNet-18 (width 64) on CIFAR-10/100 and VGG11 on SVHN, 50 epochs at
batch 100, random-crop/flip augmentation, momentum 0.9 switched on after the first epoch, FOOF
and KFAC inverting every ``T=500`` steps from the ``S=10`` steps before (SVHN: ``T=100, S=50``),
BatchNorm parameters trained by SGD only.

``quick`` mode keeps every figure's structure but runs it on ``fake-cifar10`` (generated
CIFAR-shaped images, see :mod:`foof.data.vision`) with width-4 networks, 128 images, batch 32,
2 epochs and ``T=4, S=2``, one seed: seconds on a CPU, so that ``foof reproduce all --mode
quick`` exercises the whole conv pipeline (BatchNorm ResNets, augmentation, delayed momentum,
Polyak averaging, resume) in CI. Its verdicts are no evidence about the paper.

Starting hyperparameters are the paper's Table D.4 values for Fig. 5 (in the paper's scaling,
which differs from foof's; see the README's Conventions); the appendix figures reuse Fig. 5C's,
untuned. ``foof tune`` replaces them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from foof.callbacks import POLYAK_DECAY
from foof.experiments.checks import Below, RatioAtMost
from foof.experiments.spec import Figure, Run

TIME = "time_per_update"

NO_LOW_RANK = {"low_rank": False}
"""FOOF's and KFAC's option for the conv nets: no per-step capture for the ``Ĝ = EᵀA`` product,
which is never the cheaper one for a convolution (rows = batch x positions) but, when enabled,
records every layer's unfolded inputs on every step (4x SGD's step time on the CPU WRN-18, see
docs/benchmarks/wrn-cpu.md). The update is the same either way."""

QUICK_WIDTH = 4
"""Channels of the first stage of the networks in quick mode (64 in standard mode)."""

QUICK_REDUCTION = (
    "quick mode: fake-cifar10 (generated CIFAR-shaped images, not {data}), width-4 networks, "
    "128 images, batch 32, 2 epochs, T=4 and S=2; one seed. A smoke test of the pipeline on CPU."
)

FAKE_DATA_NOTE = " In quick mode every run trains on fake-cifar10 (generated tensors) on CPU."

D6_NOTE = (
    "App. D.6 setting: random crops of the 4-pixel-padded image and horizontal flips, channels "
    "normalised to zero mean and unit variance; momentum 0.9 for all methods, switched on only "
    "after the first epoch; FOOF and KFAC invert every T steps from the S steps before; "
    "BatchNorm parameters are present but not trained for FOOF and KFAC (SGD trains them); "
    "FOOF and KFAC run with `low_rank=False` (same update, no per-step capture). "
    "The paper does not state the ResNet's width; foof uses the CIFAR ResNet-18 with 64-512 "
    "channels (11.2M parameters)."
)


def _quick(mode: str) -> bool:
    return mode == "quick"


def conv_base(
    mode: str, dataset: str = "cifar10", model: str = "wrn18", batch_size: int = 100
) -> dict[str, Any]:
    """The TrainConfig fields shared by the conv figures (App. D.6) in ``mode``."""
    base: dict[str, Any] = dict(model=model, augment=True, momentum_delay=1)
    if _quick(mode):
        # No evaluation on the training set: after a few steps BatchNorm's running statistics
        # are far from the batch statistics, so eval-mode losses would mean nothing.
        base.update(
            dataset="fake-cifar10", subset=128, batch_size=32, epochs=2, eval_every_epoch=False
        )
    else:
        base.update(dataset=dataset, batch_size=batch_size, epochs=50, eval_train=True)
    return base


def amortisation(mode: str, svhn: bool = False) -> dict[str, int]:
    """FOOF's and KFAC's ``inv_every``, ``stats_steps``: T=500, S=10 (App. D.6).

    SVHN: T=100, S=50 (App. D.8); quick mode: T=4, S=2.
    """
    if _quick(mode):
        return {"inv_every": 4, "stats_steps": 2}
    return {"inv_every": 100, "stats_steps": 50} if svhn else {"inv_every": 500, "stats_steps": 10}


def model_options(
    mode: str,
    *,
    batch_norm: bool | None = None,
    train_norm: bool = True,
    num_classes: int = 10,
) -> dict[str, Any]:
    """The model factory's options in ``mode``.

    Width 64 (quick mode 4); BatchNorm for the ResNet (``batch_norm`` not None), frozen if not
    ``train_norm``; ``num_classes`` (quick mode's fake data always has 10).
    """
    options: dict[str, Any] = {"width": QUICK_WIDTH if _quick(mode) else 64}
    if batch_norm is not None:
        options["batch_norm"] = batch_norm
        if batch_norm and not train_norm:
            options["train_norm"] = False
    if num_classes != 10 and not _quick(mode):
        options["num_classes"] = num_classes
    return options


def conv_runs(
    mode: str,
    *,
    suffix: str = "",
    group: str | None = None,
    batch_norm: bool | None = True,
    sgd_lr: float = 0.03,
    foof: tuple[float, float] = (30.0, 100.0),
    kfac: tuple[float, float] = (1.0, 1.0),
    num_classes: int = 10,
    svhn: bool = False,
    extra: dict[str, Any] | None = None,
) -> list[Run]:
    """SGD+M, amortised FOOF and amortised KFAC in the App. D.6 setting.

    Args:
        mode: the figure's mode.
        suffix: appended to the labels (``"sgd" + suffix``, ...).
        group: the plot panel.
        batch_norm: the ResNet's BatchNorm (``None`` for VGG11).
        sgd_lr: SGD's learning rate.
        foof: FOOF's ``(lr, damping)``.
        kfac: KFAC's ``(lr, damping)``.
        num_classes: logits of the network.
        svhn: use App. D.8's amortisation.
        extra: further TrainConfig fields of every run (e.g. ``polyak_decay``, ``batch_size``).

    Returns:
        The three runs.
    """
    extra = dict(extra or {})
    amortise = amortisation(mode, svhn)
    sgd_model = model_options(mode, batch_norm=batch_norm, num_classes=num_classes)
    curvature_model = model_options(
        mode, batch_norm=batch_norm, train_norm=False, num_classes=num_classes
    )
    return [
        Run(
            f"sgd{suffix}",
            "SGD+M",
            {"optimizer": "sgd", "lr": sgd_lr, "momentum": 0.9, "model_options": sgd_model} | extra,
            tune=("lr", "momentum"),
            group=group,
        ),
        Run(
            f"foof{suffix}",
            "FOOF",
            {
                "optimizer": "foof",
                "lr": foof[0],
                "damping": foof[1],
                "momentum": 0.9,
                "model_options": curvature_model,
                "optimizer_options": NO_LOW_RANK,
                **amortise,
            }
            | extra,
            group=group,
        ),
        Run(
            f"kfac{suffix}",
            "KFAC",
            {
                "optimizer": "kfac",
                "lr": kfac[0],
                "damping": kfac[1],
                "momentum": 0.9,
                "model_options": curvature_model,
                "optimizer_options": NO_LOW_RANK,
                **amortise,
            }
            | extra,
            group=group,
        ),
    ]


def _reduction(mode: str, data: str) -> str | None:
    return QUICK_REDUCTION.format(data=data) if _quick(mode) else None


def _test_subset(mode: str) -> int | None:
    return 256 if _quick(mode) else None


def figure_5_wrn(mode: str) -> Figure:
    """Fig. 5: Wide ResNet-18 on CIFAR-10, without and with BatchNorm and Polyak averaging."""
    panels = (
        ("-nobn", "B: no BatchNorm", False, 0.003, (10.0, 100.0), (0.03, 1.0), {}),
        ("-bn", "C: BatchNorm", True, 0.03, (30.0, 100.0), (1.0, 1.0), {}),
        (
            "-bn-polyak",
            "D: BatchNorm, Polyak averaging",
            True,
            0.03,
            (30.0, 100.0),
            (1.0, 1.0),
            {"polyak_decay": POLYAK_DECAY},
        ),
    )
    runs: list[Run] = []
    checks: list[Any] = []
    for suffix, group, batch_norm, sgd_lr, foof, kfac, extra in panels:
        runs += conv_runs(
            mode,
            suffix=suffix,
            group=group,
            batch_norm=batch_norm,
            sgd_lr=sgd_lr,
            foof=foof,
            kfac=kfac,
            extra=extra,
        )
        checks += [Below(f"foof{suffix}", f"kfac{suffix}"), Below(f"foof{suffix}", f"sgd{suffix}")]
    checks += [
        RatioAtMost("foof-bn", "sgd-bn", 1.25, metric=TIME),
        RatioAtMost("kfac-bn", "sgd-bn", 1.30, metric=TIME),
    ]
    return Figure(
        id="5WRN",
        title="Fig. 5: Wide ResNet-18 on CIFAR-10, amortised FOOF vs KFAC vs SGD",
        claim="In a Wide ResNet-18 on CIFAR-10 FOOF reaches a lower training loss than KFAC and "
        "SGD+M, with and without BatchNorm, and amortised FOOF/KFAC cost only about 10%/15% "
        "more time per update than SGD.",
        mode=mode,
        test_subset=_test_subset(mode),
        base=conv_base(mode),
        runs=tuple(runs),
        checks=tuple(checks),
        seeds=1 if _quick(mode) else 3,
        reduction=_reduction(mode, "CIFAR-10"),
        notes=D6_NOTE + " Panels: the text names Fig. 5B-D only 'different settings'; foof "
        "takes B = no BatchNorm (Table D.4's smaller SGD learning rate 0.003), C = BatchNorm, "
        f"D = BatchNorm with Polyak averaging (decay {POLYAK_DECAY}, evaluated with the "
        "averaged parameters) — our reading of Table D.4 and App. D.6. Time overheads 'about "
        "10%/15%' are checked as at most 25%/30% on panel C." + FAKE_DATA_NOTE,
        paper="+10% (FOOF) and +15% (KFAC) time per update over SGD (amortised, GPU); Table "
        "D.4: 5B SGD 0.003, KFAC 0.03/1, FOOF 10/100; 5C, 5D SGD 0.03, KFAC 1/1, FOOF 30/100.",
    )


def figure_j12(mode: str) -> Figure:
    """App. J.12: subsampled KFAC vs subsampled natural gradients on the ResNet (J.3)."""
    model = model_options(mode, batch_norm=False)
    curvature = {"momentum": 0.0, "model_options": model}
    runs = (
        conv_runs(mode, batch_norm=False, sgd_lr=0.003)[0],
        Run(
            "natural",
            "Natural gradient (MC)",
            {"optimizer": "natural", "lr": 0.03, "damping": 1.0, **curvature},
        ),
        Run(
            "kfac-subsampled",
            "Subsampled KFAC",
            {
                "optimizer": "kfac",
                "lr": 0.03,
                "damping": 1.0,
                "ema_decay": 0.0,
                "optimizer_options": NO_LOW_RANK,
                **curvature,
            },
        ),
        Run(
            "kfac",
            "KFAC",
            {
                "optimizer": "kfac",
                "lr": 0.03,
                "damping": 1.0,
                "optimizer_options": NO_LOW_RANK,
                **amortisation(mode),
                **curvature,
            },
        ),
    )
    return Figure(
        id="J12",
        title="App. J.12: subsampled KFAC vs subsampled natural gradients (ResNet, CIFAR-10)",
        claim="On a ResNet on CIFAR-10, KFAC outperforms subsampled natural gradients, also when "
        "KFAC is subsampled and uses exactly the same data to estimate its curvature.",
        mode=mode,
        test_subset=_test_subset(mode),
        base=conv_base(mode),
        runs=runs,
        checks=(Below("kfac-subsampled", "natural"), Below("kfac", "natural")),
        seeds=1 if _quick(mode) else 3,
        reduction=_reduction(mode, "CIFAR-10"),
        notes=D6_NOTE + " Here the ResNet has no BatchNorm (natural gradients need per-example "
        "gradients, which BatchNorm couples); natural gradients and subsampled KFAC "
        "(`ema_decay=0`) recompute their curvature on every step's own mini-batch and, as in "
        "Fig. 1B, use no momentum (the J.12 caption attributes SGD+M's lead over natural "
        "gradients to momentum). Hyperparameters are Fig. 5B's KFAC values, untuned."
        + FAKE_DATA_NOTE,
    )


def figure_j14(mode: str) -> Figure:
    """App. J.14: heuristic vs standard damping in KFAC on the ResNet (J.4)."""
    sgd_run, _, kfac_run = conv_runs(mode, batch_norm=True)
    standard = Run(
        "kfac-standard",
        "KFAC (standard damping)",
        {**kfac_run.overrides, "optimizer_options": {**NO_LOW_RANK, "damping_mode": "standard"}},
    )
    return Figure(
        id="J14",
        title="App. J.14: heuristic vs standard damping in KFAC (ResNet, CIFAR-10)",
        claim="Heuristic damping is essential for KFAC's performance on a ResNet on CIFAR-10: "
        "with standard damping KFAC reaches a clearly higher training loss.",
        mode=mode,
        test_subset=_test_subset(mode),
        base=conv_base(mode),
        runs=(sgd_run, kfac_run, standard),
        checks=(Below("kfac", "kfac-standard"),),
        seeds=1 if _quick(mode) else 3,
        reduction=_reduction(mode, "CIFAR-10"),
        notes=D6_NOTE + " The ResNet with BatchNorm (Fig. 5C's setting and hyperparameters, "
        "untuned for standard damping)." + FAKE_DATA_NOTE,
    )


def figure_j16(mode: str) -> Figure:
    """App. J.16: Wide ResNet-18 on CIFAR-100 (J.5)."""
    return Figure(
        id="J16",
        title="App. J.16: Wide ResNet-18 on CIFAR-100",
        claim="On CIFAR-100 with a Wide ResNet-18, as on CIFAR-10, FOOF reaches a lower training "
        "loss than KFAC and SGD+M.",
        mode=mode,
        test_subset=_test_subset(mode),
        base=conv_base(mode, dataset="cifar100"),
        runs=tuple(conv_runs(mode, batch_norm=True, num_classes=100)),
        checks=(Below("foof", "kfac"), Below("foof", "sgd")),
        seeds=1 if _quick(mode) else 3,
        reduction=_reduction(mode, "CIFAR-100; 10 classes"),
        notes=D6_NOTE
        + " The ResNet with BatchNorm and Fig. 5C's hyperparameters (untuned)."
        + FAKE_DATA_NOTE,
    )


SVHN_BATCHES = (128, 256, 512, 1024)
"""The batch sizes of App. J.17/J.18."""


def figure_j17(mode: str) -> Figure:
    """App. J.17/J.18: VGG11 on SVHN across batch sizes (J.5, App. D.8)."""
    batches = (16, 32) if _quick(mode) else SVHN_BATCHES
    runs: list[Run] = []
    checks: list[Any] = []
    for batch in batches:
        suffix = f"-b{batch}"
        runs += conv_runs(
            mode,
            suffix=suffix,
            group=f"batch {batch}",
            batch_norm=None,
            svhn=True,
            extra={"batch_size": batch},
        )
        checks += [Below(f"foof{suffix}", f"kfac{suffix}"), Below(f"foof{suffix}", f"sgd{suffix}")]
    return Figure(
        id="J17",
        title="App. J.17/J.18: VGG11 on SVHN across batch sizes",
        claim="On SVHN with a VGG11 network (no BatchNorm), FOOF reaches a lower training loss "
        "than KFAC and SGD+M at batch sizes 128 to 1024.",
        mode=mode,
        test_subset=_test_subset(mode),
        base=conv_base(mode, dataset="svhn", model="vgg11"),
        runs=tuple(runs),
        checks=tuple(checks),
        seeds=1 if _quick(mode) else 3,
        reduction=(_reduction(mode, "SVHN") or "").replace("batch 32", "batches 16 and 32") or None,
        notes="App. D.8: VGG11 without BatchNorm, CIFAR-10's preprocessing and augmentation, "
        "inverses every T=100 steps from the S=50 steps before; other settings as App. D.6 "
        "(50 epochs, momentum after the first epoch). The paper gives no hyperparameters for "
        "SVHN; these are Fig. 5C's, untuned, the same for every batch size." + FAKE_DATA_NOTE,
    )


CONV_FIGURES: dict[str, Callable[[str], Figure]] = {
    "5WRN": figure_5_wrn,
    "J12": figure_j12,
    "J14": figure_j14,
    "J16": figure_j16,
    "J17": figure_j17,
}
"""The conv figures by id, registered into :data:`foof.experiments.figures.FIGURES`."""

CONV_ALIASES = {"FIG5": "5WRN", "WRN": "5WRN", "J18": "J17"}
"""Other names of the conv figures on the command line."""

CONV_DATASETS = {
    "5WRN": "cifar10",
    "J12": "cifar10",
    "J14": "cifar10",
    "J16": "cifar100",
    "J17": "svhn",
}
"""The real dataset each conv figure needs in standard mode."""
