"""The one training loop of foof: every experiment is a :class:`TrainConfig` run by :func:`train`.

A step is the same for every optimizer::

    opt.zero_grad()
    out = model(x)
    loss = loss_fn(out, target)
    backward(opt, loss, out)  # not loss.backward()
    opt.step()

where :func:`foof.optim.registry.backward` lets curvature methods run their extra Fisher pass.

Losses (both means over the batch, as foof's curvature optimizers assume):

* classification (``mlp``, ``logistic``, ``cnn``): softmax cross-entropy of the logits;
* reconstruction (``autoencoder``, App. D.7): ``½‖f(x_i) − x_i‖²`` per image, summed over the
  784 normalised pixels and averaged over images, i.e. the negative log-likelihood of a
  unit-variance Gaussian up to a constant. This is the ``likelihood="gaussian"`` convention of
  KFAC and natural gradients, which the loop selects for them. (The tensorflow/kfac example the
  paper follows uses a Bernoulli cross-entropy on ``[0, 1]`` pixels, but the paper preprocesses
  the data to zero mean and unit variance, which a Bernoulli likelihood cannot model.)

Distributed: launched by ``torchrun --nproc-per-node N`` (``$WORLD_SIZE`` > 1), or with the
default process group already initialised, :func:`train` runs data-parallel: it initialises the
group if needed (gloo on CPU, NCCL on CUDA, each rank on GPU ``$LOCAL_RANK``), wraps the model in
``DistributedDataParallel`` (the optimizer hooks the unwrapped model), and gives rank ``r`` the
``r``-th of ``N`` contiguous slices of every global mini-batch of ``batch_size`` (all ranks draw
the same permutation). With ``batch_size`` divisible by ``N`` a step is the step one process
takes on the whole mini-batch; an uneven split (only a short last batch, or ``batch_size`` not
divisible by ``N``) averages the ranks' gradients with equal weights, as DDP does. Only rank 0
shows progress and writes the results file; every rank evaluates the full test set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from foof import checkpoint as checkpoints
from foof import distributed
from foof.data import DataError, Dataset, load_dataset
from foof.data.augment import augment_batch
from foof.io import write_json_atomic
from foof.models import TASKS, build_model
from foof.optim.kronecker import WARM_START_BATCHES
from foof.optim.registry import OPTIMIZERS, backward, build_optimizer

RESULTS_FORMAT = "foof.train/1"
"""Version tag of the results dictionary written by :func:`train`."""

DEFAULT_HYPERPARAMETERS: dict[str, dict[str, float]] = {
    "sgd": {"lr": 0.01, "momentum": 0.9},
    "adam": {"lr": 1e-4},
    "foof": {"lr": 30.0, "damping": 100.0},
    "kfac": {"lr": 0.3, "damping": 1.0},
    "natural": {"lr": 1e-5, "damping": 1e-4},
}
"""Hyperparameters used where a :class:`TrainConfig` leaves them ``None``.

Learning rates and damping are the paper's Table D.4 values for the Fashion-MNIST MLP (Fig. 1A:
SGD with momentum, Adam, KFAC, MC natural gradients; Fig. 4B: FOOF). Only SGD gets momentum
(0.9, the paper's "SGD+M" baseline): with momentum 0.9 on top, the curvature methods' values
degrade or diverge in foof (checked for 2 epochs on 10,000 Fashion-MNIST images, where without
momentum all three reach a training loss of about 0.3 against SGD+M's 0.4). They are starting
points, not tuned values: the paper notes (App. D.4) that damping scales depend on how an
implementation normalises its curvature, so other models, batch sizes or data need a search.
"""

WARM_START_OPTIMIZERS = ("foof", "kfac")
"""Optimizers whose statistics :func:`train` initialises before the first update (App. K)."""

LIKELIHOOD_OPTIMIZERS = ("kfac", "natural")
"""Optimizers that take a ``likelihood`` argument; the loop sets it from the model's task."""

_LIKELIHOODS = {"classification": "categorical", "reconstruction": "gaussian"}
LossFunction = Callable[[Tensor, Tensor], Tensor]
"""A loss: network output and target ``(B, ...)`` to a scalar mean over the batch."""

DIVERGENCE_FACTOR = 1e6
"""A step loss above this many times ``max(1, first step's loss)`` counts as divergence."""

_EVAL_BATCH = 1000  # bounds evaluation memory (a CNN on 10,000 images needs ~1 GB at once)


class ConfigError(ValueError):
    """A :class:`TrainConfig` that cannot be run; the message names the offending field."""


@dataclass
class StepContext:
    """What a :class:`TrainCallback` sees of one training step.

    Attributes:
        step: index of the step in the run, from 0.
        epoch: the current epoch, from 1.
        model: the network (in training mode).
        optimizer: the optimizer; before ``opt.step()`` its state is that of the previous step.
        inputs: the mini-batch inputs ``(B, ...)``.
        targets: the mini-batch targets (labels, or the flattened images for reconstruction).
        output: the network output of the step's forward pass.
        loss: the step's loss (a scalar tensor, graph still attached).
        loss_fn: the loss function, ``loss_fn(model(inputs), targets)`` is the step's loss.
    """

    step: int
    epoch: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    inputs: Tensor
    targets: Tensor
    output: Tensor
    loss: Tensor
    loss_fn: LossFunction


class TrainCallback:
    """Per-step instrumentation hook of :func:`train`; override either method.

    ``before_step`` runs after the backward pass (gradients are in ``p.grad``) and before
    ``opt.step()``; ``after_step`` right after it (``p.grad`` still holds the step's gradient).
    Time spent in callbacks is excluded from the step times :func:`train` records, so
    instrumented runs still measure the optimizer's own cost. Callbacks that evaluate the
    model should do so under ``torch.no_grad()``, which foof's optimizers do not record.

    Example:
        >>> class LossLog(TrainCallback):
        ...     def __init__(self):
        ...         self.losses = []
        ...     def after_step(self, context):
        ...         self.losses.append(context.loss.item())
    """

    def before_step(self, context: StepContext) -> None:
        """Called after ``backward`` and before ``opt.step()``."""

    def after_step(self, context: StepContext) -> None:
        """Called right after ``opt.step()``."""

    def evaluation(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        """A context entered around every evaluation (e.g. to swap in averaged parameters)."""
        return contextlib.nullcontext()


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; saved, resolved, next to its results.

    Hyperparameters left ``None`` take the optimizer's entry in
    :data:`DEFAULT_HYPERPARAMETERS`, else the optimizer's own default; :meth:`resolved` fills
    them in.

    Attributes:
        dataset: ``"fashion-mnist"`` or ``"mnist"``.
        model: a key of :data:`foof.models.MODELS`.
        optimizer: a key of :data:`foof.optim.registry.OPTIMIZERS`.
        lr: learning rate.
        damping: damping ``λ`` of curvature methods (ignored by SGD and Adam).
        momentum: heavy-ball momentum (ignored by Adam).
        weight_decay: weight decay (decoupled for foof's optimizers, L2 for SGD/Adam).
        ema_decay: decay of the curvature EMAs (FOOF, KFAC).
        inv_every: inversion period ``T`` (Algorithm 1).
        stats_steps: statistics steps ``S`` before each inversion (Algorithm 1).
        init_batches: mini-batches of statistics FOOF and KFAC take before the first update
            (App. K, "Initialisation"; ``warm_start`` of
            :class:`~foof.optim.kronecker.KroneckerFactoredOptimizer`), drawn from their own
            permutation of the training set (seeded with ``seed + 2``), so the training
            batches are the same with or without it. ``None`` resolves to 50 for those two and
            stays ``None`` (unused) for the others; ``0`` turns it off.
        optimizer_options: further keyword arguments of the optimizer (e.g. ``fisher="full"``).
        model_options: keyword arguments of the model factory (e.g. ``hidden=[100]``).
        epochs: passes over the training set.
        batch_size: mini-batch size (the global one, split over ranks, under ``torchrun``);
            ``None`` or ``0`` for full-batch gradient descent.
        subset: train on this many training images (the paper's 1,000-image runs); ``None``
            for all.
        subset_seed: seed of the subset draw, separate from ``seed`` so that runs with
            different seeds share the same 1,000 images.
        seed: seeds the model initialisation, the mini-batch order and (through torch's global
            RNG) any sampling inside the optimizer.
        data_dir: directory searched first for the data (see :func:`foof.data.load_dataset`).
        device: torch device to train on, e.g. ``"cpu"`` or ``"cuda"``.
        eval_every_epoch: evaluate on the test set after every epoch (else after the last).
        eval_train: also evaluate the loss on the whole training set after each evaluation
            (costs one extra forward pass over it).
        augment: augment every training mini-batch with a random 4-pixel-padded crop and a
            random horizontal flip (App. D.6; :func:`foof.data.augment.augment_batch`), drawn
            from a generator seeded with ``seed + 1``.
        momentum_delay: train the first this many epochs without momentum and switch
            ``momentum`` on afterwards (App. D.6 uses 1; :class:`foof.callbacks.DelayedMomentum`).
        polyak_decay: if set, keep an exponential moving average of the parameters with this
            decay and evaluate with it (Polyak averaging, App. D.6;
            :class:`foof.callbacks.PolyakAveraging`).
    """

    dataset: str = "fashion-mnist"
    model: str = "mlp"
    optimizer: str = "sgd"
    lr: float | None = None
    damping: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    ema_decay: float | None = None
    inv_every: int | None = None
    stats_steps: int | None = None
    init_batches: int | None = None
    optimizer_options: Mapping[str, Any] = field(default_factory=dict)
    model_options: Mapping[str, Any] = field(default_factory=dict)
    epochs: int = 10
    batch_size: int | None = 100
    subset: int | None = None
    subset_seed: int = 0
    seed: int = 0
    data_dir: str | None = None
    device: str = "cpu"
    eval_every_epoch: bool = True
    eval_train: bool = False
    augment: bool = False
    momentum_delay: int = 0
    polyak_decay: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy (mappings become plain dicts, tuples lists)."""
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`.

        Args:
            values: field names to values; missing fields keep their defaults.

        Returns:
            The config.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"unknown TrainConfig field(s): {', '.join(unknown)}")
        return cls(**values)

    def optimizer_hyperparameters(self) -> dict[str, Any]:
        """Keyword arguments for :func:`~foof.optim.registry.build_optimizer`, ``None`` kept."""
        names = ("lr", "damping", "momentum", "weight_decay", "ema_decay", "inv_every")
        kwargs = {name: getattr(self, name) for name in (*names, "stats_steps")}
        return {**kwargs, **dict(self.optimizer_options)}

    def resolved(self) -> TrainConfig:
        """This config with every default the run will use written out.

        ``None`` hyperparameters take :data:`DEFAULT_HYPERPARAMETERS`; ``init_batches`` takes
        :data:`~foof.optim.kronecker.WARM_START_BATCHES` for :data:`WARM_START_OPTIMIZERS`;
        optimizers in :data:`LIKELIHOOD_OPTIMIZERS` get ``likelihood`` from the model's task
        (``"gaussian"`` for the autoencoder) unless ``optimizer_options`` sets it.
        """
        defaults = DEFAULT_HYPERPARAMETERS.get(self.optimizer, {})
        fills: dict[str, Any] = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        if self.init_batches is None and self.optimizer in WARM_START_OPTIMIZERS:
            fills["init_batches"] = WARM_START_BATCHES
        options = dict(self.optimizer_options)
        if self.optimizer in LIKELIHOOD_OPTIMIZERS and self.model in TASKS:
            options.setdefault("likelihood", _LIKELIHOODS[TASKS[self.model]])
        return dataclasses.replace(self, optimizer_options=options, **fills)

    def validate(self) -> None:
        """Raise :class:`ConfigError` for values no run could use."""
        from foof.data import ALL_DATASETS
        from foof.models import MODELS

        for name, value, choices in (
            ("dataset", self.dataset, ALL_DATASETS),
            ("model", self.model, tuple(MODELS)),
            ("optimizer", self.optimizer, OPTIMIZERS),
        ):
            if value not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        for name in ("epochs", "batch_size", "subset", "momentum_delay", "init_batches"):
            value = getattr(self, name)
            low = 0 if name != "subset" else 1
            if value is not None and (not isinstance(value, int) or value < low):
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.polyak_decay is not None and not 0.0 <= self.polyak_decay < 1.0:
            raise ConfigError(f"polyak_decay must be in [0, 1) or None, got {self.polyak_decay!r}")
        if self.init_batches and self.optimizer not in WARM_START_OPTIMIZERS:
            raise ConfigError(
                f"init_batches is for {' and '.join(WARM_START_OPTIMIZERS)} (App. K), not "
                f"{self.optimizer!r}; leave it None"
            )
        if self.lr is None and self.optimizer not in DEFAULT_HYPERPARAMETERS:
            raise ConfigError(f"optimizer {self.optimizer!r} has no default lr; set lr")
        try:
            device = torch.device(self.device)
        except RuntimeError as error:
            raise ConfigError(f"device {self.device!r} is not a torch device: {error}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r} requested but CUDA is not available")


def train(
    config: TrainConfig,
    out_path: str | os.PathLike[str] | None = None,
    progress: bool = True,
    *,
    data: Dataset | None = None,
    download: bool = False,
    callbacks: Sequence[TrainCallback] = (),
    checkpoint: str | os.PathLike[str] | None = None,
    stop_after_epochs: int | None = None,
) -> dict[str, Any]:
    """Train ``config.model`` with ``config.optimizer`` and return (and save) the results.

    A loss that is non-finite or above :data:`DIVERGENCE_FACTOR` times ``max(1, the first
    step's loss)`` stops the run early with ``diverged: true`` instead of raising (a search
    records a diverged run as a result); the diverging step's loss is not recorded, and
    non-finite numbers are stored as ``null`` so the results stay valid JSON.

    Times (``steps.time``, ``epochs.time``) are seconds of training since the start, excluding
    evaluation, so that methods can be compared in wall-clock time; ``total_time`` is the whole
    run including data loading and evaluation.

    Args:
        config: the run. ``None`` hyperparameters are resolved first (see
            :meth:`TrainConfig.resolved`); the resolved config is what the results record.
        out_path: if given, the results are written there as JSON (atomically) after every
            epoch with ``complete: false`` and at the end with ``complete: true``.
        progress: show a tqdm progress bar on stderr.
        data: an already loaded dataset to use instead of loading ``config.dataset`` (e.g. when
            a sweep runs many configs); it must match ``config.dataset`` and ``config.subset``.
        download: let :func:`foof.data.load_dataset` fetch a missing dataset.
        checkpoint: a checkpoint file (see :mod:`foof.checkpoint`). If it exists, the run
            resumes from it (it must have been made with the same config); it is updated at
            the end of every epoch, and on SIGINT/SIGTERM the run finishes its current step,
            saves it with the partial results and raises
            :class:`~foof.checkpoint.TrainingInterrupted`; it is deleted when the run completes.
            Callbacks with ``state_dict``/``load_state_dict`` methods are checkpointed too.
        callbacks: per-step hooks (see :class:`TrainCallback`), called in order after those
            the config asks for (``momentum_delay``, ``polyak_decay``); their time is not
            counted in the recorded step times.
        stop_after_epochs: train only the first this many of ``config.epochs`` epochs: the
            run is evaluated as if it ended there, the results say ``complete: false`` and
            ``stopped_after_epoch``, and the checkpoint (required) is kept, so a later call
            with a larger value (or ``None``) continues the same run. The trajectory does not
            depend on where it stops (evaluation touches no RNG and no statistics): a prefix
            of the full run, which successive halving in ``foof tune`` relies on.

    Returns:
        The results: ``format``, ``complete``, ``config`` (resolved), ``environment``,
        ``dataset`` (name, source, caveats, sizes), ``model`` (name, task, ``num_parameters``),
        ``steps`` (``loss``, ``time``: one entry per step), ``epochs`` (``epoch``,
        ``train_loss`` (mean of the epoch's step losses), ``test_loss``, ``test_accuracy``,
        ``time``, and ``train_eval_loss`` if ``eval_train``), ``initial`` (test metrics before
        training), ``final`` (last entries), ``diverged``, ``diverged_step``, ``total_time``.
        ``test_accuracy`` is ``None`` for the autoencoder.

    Raises:
        ConfigError: the config is invalid, the optimizer rejects its hyperparameters,
            ``config.data_dir`` is not a directory or ``config.subset`` exceeds the data.
        foof.data.DataError: the dataset is missing or corrupt.

    Example:
        >>> cfg = TrainConfig(model="logistic", optimizer="sgd", lr=0.01, epochs=1, subset=100)
        >>> results = train(cfg, progress=False)  # doctest: +SKIP
        >>> results["final"]["test_accuracy"]  # doctest: +SKIP
        0.61
    """
    start = time.perf_counter()
    config = config.resolved()
    config.validate()
    if stop_after_epochs is not None:
        if not isinstance(stop_after_epochs, int) or not 1 <= stop_after_epochs:
            raise ConfigError(
                f"stop_after_epochs must be an integer >= 1, got {stop_after_epochs!r}"
            )
        if checkpoint is None and stop_after_epochs < config.epochs:
            raise ConfigError("stop_after_epochs needs a checkpoint to continue the run from")
    stop_epoch = min(stop_after_epochs or config.epochs, config.epochs)
    task = TASKS[config.model]
    if data is None:
        check_data_dir(config.data_dir)
        try:
            data = load_dataset(
                config.dataset,
                data_dir=config.data_dir,
                subset=config.subset,
                seed=config.subset_seed,
                download=download,
            )
        except DataError:
            raise
        except ValueError as error:  # a subset larger than the data
            raise ConfigError(str(error)) from error
    elif data.name != config.dataset:
        raise ConfigError(f"data holds {data.name!r} but config.dataset is {config.dataset!r}")
    elif config.subset is not None and len(data.y_train) != config.subset:
        raise ConfigError(
            f"data holds {len(data.y_train)} training images but config.subset is {config.subset}"
        )

    distributed.init_from_environment(config.device)
    rank, world = distributed.rank(), distributed.world_size()
    device = distributed.local_device(config.device)
    torch.manual_seed(config.seed)
    try:
        model = build_model(config.model, **dict(config.model_options)).to(device)
    except (TypeError, ValueError) as error:
        raise ConfigError(
            f"model {config.model!r} rejects {config.model_options}: {error}"
        ) from error
    optimizer = _build_optimizer(config, model)  # hooks the unwrapped model's layers
    network = model
    if world > 1:
        network = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    loss_fn = _LOSSES[task]
    shuffle = torch.Generator().manual_seed(config.seed)
    augmenter = torch.Generator().manual_seed(config.seed + 1) if config.augment else None
    from foof.callbacks import config_callbacks  # foof.callbacks builds on this module

    callbacks = [*config_callbacks(config, model), *callbacks]

    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    if task == "reconstruction":
        y_train, y_test = x_train.flatten(1), x_test.flatten(1)
    n = len(x_train)
    batch = n if not config.batch_size else min(config.batch_size, n)
    if batch < world:
        raise ConfigError(f"batch_size {batch} leaves some of the {world} ranks without data")
    steps_per_epoch = math.ceil(n / batch)

    results = _new_results(config, data, model, task, device)
    train_time = 0.0
    checkpoint_path = Path(checkpoint) if checkpoint is not None else None
    first_epoch, resume_index, resume_order, resume_losses = 1, 0, None, []
    if checkpoint_path is not None and checkpoint_path.exists():
        saved = checkpoints.load(checkpoint_path, config.to_dict())
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        for callback, state in zip(callbacks, saved["callbacks"]):
            if state is not None and hasattr(callback, "load_state_dict"):
                callback.load_state_dict(state)
        checkpoints.restore_generators(saved["generators"], shuffle, augmenter)
        torch.set_rng_state(saved["torch_rng"])
        results, train_time = saved["results"], saved["train_time"]
        results["resumed"] = results.get("resumed", 0) + 1
        start = time.perf_counter() - results.get("total_time", 0.0)  # total_time accumulates
        first_epoch, resume_index = saved["epoch"], saved["next_index"]
        resume_order, resume_losses = saved["order"], saved["epoch_losses"]
    else:
        test_loss, test_accuracy = _evaluate(model, loss_fn, x_test, y_test, task, callbacks)
        results["initial"] = {"test_loss": test_loss, "test_accuracy": test_accuracy}
        if config.init_batches:
            tick = time.perf_counter()
            used = _warm_start(optimizer, model, loss_fn, x_train, y_train, batch, config)
            # part of the method's cost: counted in the training time of the first step
            train_time += time.perf_counter() - tick
            results["warm_start"] = {"batches": used, "time": train_time}

    def save_checkpoint(epoch: int, next_index: int, order: Tensor | None, losses: list) -> None:
        if checkpoint_path is None or rank != 0:
            return
        _finish(results, start)
        checkpoints.save(
            checkpoint_path,
            {
                "config": config.to_dict(),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "callbacks": [
                    c.state_dict() if hasattr(c, "state_dict") else None for c in callbacks
                ],
                "generators": checkpoints.generator_states(shuffle, augmenter),
                "torch_rng": torch.get_rng_state(),
                # plain JSON types only (the environment's torch version is a str subclass,
                # which weights_only loading refuses)
                "results": json.loads(json.dumps(results)),
                "train_time": train_time,
                "epoch": epoch,
                "next_index": next_index,
                "order": None if order is None else order.cpu(),
                "epoch_losses": list(losses),
            },
        )

    # single-process runs with a checkpoint stop cleanly on SIGINT/SIGTERM; under torchrun the
    # ranks would stop at different steps, so they keep the default behaviour there
    stop = checkpoints.StopSignals(enabled=checkpoint_path is not None and world == 1)
    bar = tqdm(
        initial=len(results["steps"]["loss"]),
        total=config.epochs * steps_per_epoch,
        disable=not progress or rank != 0,
        desc=f"{config.optimizer} {config.model} {config.dataset}",
        unit="step",
        dynamic_ncols=True,
    )
    with stop, bar:  # handlers restored and the bar closed however the loop ends
        for epoch in range(first_epoch, config.epochs + 1):
            tick = time.perf_counter()
            if resume_order is not None:  # the interrupted epoch, from where it stopped
                order, begin, epoch_losses = resume_order.to(device), resume_index, resume_losses
                resume_order = None
            else:
                order, begin = torch.randperm(n, generator=shuffle).to(device), 0
                epoch_losses: list[float] = []
            for first in range(begin, n, batch):
                index = order[first : first + batch].tensor_split(world)[rank]
                optimizer.zero_grad()
                inputs = x_train[index]
                if augmenter is not None:
                    inputs = augment_batch(inputs, augmenter)
                output = network(inputs)
                loss = loss_fn(output, y_train[index])
                value = _global_mean(loss, len(index))
                first_loss = results["steps"]["loss"][0] if results["steps"]["loss"] else value
                if not value <= DIVERGENCE_FACTOR * max(1.0, first_loss):  # NaN included
                    results["diverged"] = True
                    results["diverged_step"] = len(results["steps"]["loss"])
                    break
                backward(optimizer, loss, output)
                if callbacks:
                    context = StepContext(
                        step=len(results["steps"]["loss"]),
                        epoch=epoch,
                        model=model,
                        optimizer=optimizer,
                        inputs=inputs,
                        targets=y_train[index],
                        output=output,
                        loss=loss,
                        loss_fn=loss_fn,
                    )
                    tick += _run_callbacks(callbacks, "before_step", context)
                optimizer.step()
                if callbacks:
                    tick += _run_callbacks(callbacks, "after_step", context)
                epoch_losses.append(value)
                results["steps"]["loss"].append(value)
                results["steps"]["time"].append(train_time + time.perf_counter() - tick)
                bar.update()
                if bar.n % 10 == 0 or bar.n == bar.total:
                    bar.set_postfix(loss=f"{value:.4f}", refresh=False)
                if stop.received:
                    train_time += time.perf_counter() - tick
                    save_checkpoint(epoch, first + batch, order, epoch_losses)
                    if out_path is not None:
                        write_json_atomic(out_path, results)
                    raise checkpoints.TrainingInterrupted(stop.received, checkpoint_path)
            train_time += time.perf_counter() - tick
            last = results["diverged"] or epoch == config.epochs
            pause = not last and epoch == stop_epoch
            if epoch_losses and (config.eval_every_epoch or last or pause):
                _record_epoch(results, epoch, epoch_losses, train_time)
                test_loss, test_accuracy = _evaluate(
                    model, loss_fn, x_test, y_test, task, callbacks
                )
                results["epochs"]["test_loss"].append(test_loss)
                results["epochs"]["test_accuracy"].append(test_accuracy)
                if config.eval_train:
                    train_loss, _ = _evaluate(model, loss_fn, x_train, y_train, task, callbacks)
                    results["epochs"]["train_eval_loss"].append(train_loss)
            if not last:
                save_checkpoint(epoch + 1, 0, None, [])
            if out_path is not None and not last and rank == 0:
                _finish(results, start)
                write_json_atomic(out_path, results)
            if results["diverged"]:
                break
            if pause:
                results["stopped_after_epoch"] = epoch
                _finish(results, start)
                if out_path is not None and rank == 0:
                    write_json_atomic(out_path, results)
                return results
    results["complete"] = True
    _finish(results, start)
    if out_path is not None and rank == 0:
        write_json_atomic(out_path, results)
    if checkpoint_path is not None and rank == 0:
        checkpoint_path.unlink(missing_ok=True)
    return results


def warm_start_indices(
    n: int, batch: int, count: int, seed: int, device: torch.device | str = "cpu"
) -> list[Tensor]:
    """The ``count`` mini-batches (indices into ``n`` samples) of App. K's initialisation.

    Drawn from their own permutations (generator seeded ``seed + 2``, repeated when ``count``
    batches need more than ``n`` samples), so the training order does not depend on them.
    ``foof train`` and ``foof bench`` both take their warm-start batches here.
    """
    generator = torch.Generator().manual_seed(seed + 2)
    order = torch.cat(
        [torch.randperm(n, generator=generator) for _ in range(math.ceil(count * batch / n))]
    ).to(device)
    return [order[i * batch : (i + 1) * batch] for i in range(count)]


def _warm_start(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    loss_fn: LossFunction,
    x_train: Tensor,
    y_train: Tensor,
    batch: int,
    config: TrainConfig,
) -> int:
    """App. K's initialisation: ``config.init_batches`` batches of statistics, no update.

    The batches are :func:`warm_start_indices`; under ``torch.distributed`` each rank takes its
    slice of every global batch, as in training. No augmentation.
    """
    rank, world = distributed.rank(), distributed.world_size()
    indices = [
        index.tensor_split(world)[rank]
        for index in warm_start_indices(
            len(x_train), batch, config.init_batches, config.seed, x_train.device
        )
    ]
    return optimizer.warm_start(
        ((x_train[index], y_train[index]) for index in indices),
        loss_fn=loss_fn,
        num_batches=config.init_batches,
        model=model,
    )


def check_data_dir(data_dir: str | os.PathLike[str] | None) -> None:
    """Refuse a data directory that does not exist, instead of falling back to the cache.

    Raises:
        ConfigError: ``data_dir`` is given and is not a directory.
    """
    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        raise ConfigError(
            f"data directory {data_dir} does not exist (or is not a directory); pass the "
            "directory that holds the dataset files, or leave --data-dir out to search "
            "$FOOF_DATA and the user cache"
        )


def _global_mean(loss: Tensor, count: int) -> float:
    """The loss over the global batch (all ranks agree on it, so they stop together)."""
    if not distributed.is_distributed():
        return loss.item()
    total = torch.stack([loss.detach() * count, loss.new_tensor(float(count))]).double()
    distributed.all_reduce_sum_([total])
    return float(total[0] / total[1])


def _run_callbacks(callbacks: Sequence[TrainCallback], hook: str, context: StepContext) -> float:
    """Call ``hook`` of every callback; returns the seconds it took (kept out of step times)."""
    start = time.perf_counter()
    for callback in callbacks:
        getattr(callback, hook)(context)
    return time.perf_counter() - start


def cross_entropy(output: Tensor, labels: Tensor) -> Tensor:
    """Mean softmax cross-entropy: logits ``(B, C)``, int64 labels ``(B,)`` → scalar."""
    return nn.functional.cross_entropy(output, labels)


def reconstruction_error(output: Tensor, target: Tensor) -> Tensor:
    """``mean_i ½‖output_i − target_i‖²``: reconstructions and targets ``(B, D)`` → scalar.

    Summed over the ``D`` pixels, averaged over the batch (see the module docstring).
    """
    return 0.5 * (output - target).square().sum(dim=1).mean()


_LOSSES: dict[str, LossFunction] = {
    "classification": cross_entropy,
    "reconstruction": reconstruction_error,
}


def environment(device: torch.device | str) -> dict[str, Any]:
    """What the results of a run depend on besides its config: versions, device, threads."""
    from foof import __version__

    device = torch.device(device)
    env: dict[str, Any] = {
        "foof": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "num_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    return env


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    kwargs = config.optimizer_hyperparameters()
    try:
        return build_optimizer(config.optimizer, model, **kwargs)
    except (TypeError, ValueError) as error:
        # A hyperparameter this optimizer does not take (ema_decay for SGD) or a bad value.
        given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if v is not None)
        raise ConfigError(f"optimizer {config.optimizer!r} rejects {given}: {error}") from error


def _new_results(
    config: TrainConfig, data: Dataset, model: nn.Module, task: str, device: torch.device
) -> dict[str, Any]:
    return {
        "format": RESULTS_FORMAT,
        "complete": False,
        "config": config.to_dict(),
        "environment": {**environment(device), "world_size": distributed.world_size()},
        "dataset": data.describe(),
        "model": {
            "name": config.model,
            "task": task,
            "num_parameters": sum(p.numel() for p in model.parameters()),
        },
        "steps": {"loss": [], "time": []},
        "epochs": {
            "epoch": [],
            "train_loss": [],
            "test_loss": [],
            "test_accuracy": [],
            "time": [],
            **({"train_eval_loss": []} if config.eval_train else {}),
        },
        "initial": {},
        "final": {},
        "diverged": False,
        "diverged_step": None,
        "total_time": 0.0,
    }


def _record_epoch(
    results: dict[str, Any], epoch: int, losses: list[float], train_time: float
) -> None:
    epochs = results["epochs"]
    epochs["epoch"].append(epoch)
    epochs["train_loss"].append(_finite_or_none(math.fsum(losses) / len(losses)))
    epochs["time"].append(train_time)


@torch.no_grad()
def _evaluate(
    model: nn.Module,
    loss_fn: LossFunction,
    x: Tensor,
    y: Tensor,
    task: str,
    callbacks: Sequence[TrainCallback] = (),
) -> tuple[float | None, float | None]:
    """Mean loss and accuracy (``None`` for reconstruction or a non-finite loss) over ``x``.

    Runs inside every callback's :meth:`TrainCallback.evaluation` context.
    """
    was_training = model.training
    model.eval()
    try:
        with contextlib.ExitStack() as contexts:
            for callback in callbacks:
                contexts.enter_context(callback.evaluation(model))
            total_loss, correct = 0.0, 0
            for first in range(0, len(x), _EVAL_BATCH):
                output = model(x[first : first + _EVAL_BATCH])
                target = y[first : first + _EVAL_BATCH]
                total_loss += loss_fn(output, target).item() * len(target)
                if task == "classification":
                    correct += int((output.argmax(dim=1) == target).sum())
    finally:
        model.train(was_training)
    loss = _finite_or_none(total_loss / len(x))
    accuracy = correct / len(x) if task == "classification" and loss is not None else None
    return loss, accuracy


def _finish(results: dict[str, Any], start: float) -> None:
    epochs = results["epochs"]
    results["final"] = {
        "train_loss": epochs["train_loss"][-1] if epochs["train_loss"] else None,
        "test_loss": epochs["test_loss"][-1] if epochs["test_loss"] else None,
        "test_accuracy": epochs["test_accuracy"][-1] if epochs["test_accuracy"] else None,
    }
    results["total_time"] = time.perf_counter() - start


def results_path(config: TrainConfig, directory: str | os.PathLike[str] = "runs") -> Path:
    """The default results file: ``<directory>/<optimizer>-<model>-<dataset>-seed<S>.json``."""
    name = f"{config.optimizer}-{config.model}-{config.dataset}-seed{config.seed}.json"
    return Path(directory) / name
