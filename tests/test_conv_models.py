"""The conv experiments' pieces: WRN-18 / VGG11, FOOF and KFAC on them (BatchNorm frozen),
the augmentation, delayed momentum, Polyak averaging and the WRN timing benchmark."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from foof.benchmarks.conv import format_wrn, time_wrn
from foof.callbacks import DelayedMomentum, PolyakAveraging
from foof.conv_models import vgg11, wide_resnet18
from foof.data.augment import augment_batch
from foof.models import MODELS, TASKS, build_model
from foof.optim.registry import backward, build_optimizer
from foof.train import ConfigError, TrainCallback, TrainConfig, train

HYPERPARAMETERS = {
    "sgd": {"lr": 0.01, "momentum": 0.9},
    "foof": {"lr": 0.1, "damping": 1.0, "momentum": 0.9},
    "kfac": {"lr": 0.1, "damping": 1.0, "momentum": 0.9},
}


def _batch(n=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=generator), torch.randint(
        0, 10, (n,), generator=generator
    )


# -- models -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "options", "convs"),
    [
        (wide_resnet18, {"batch_norm": True}, 20),
        (wide_resnet18, {"batch_norm": False}, 20),
        (vgg11, {}, 8),
    ],
)
def test_shapes_layers_and_registry(factory, options, convs):
    torch.manual_seed(0)
    model = factory(width=4, num_classes=7, **options)
    assert model(torch.zeros(3, 3, 32, 32)).shape == (3, 7)
    kinds = [type(m) for m in model.modules()]
    assert kinds.count(nn.Conv2d) == convs and kinds.count(nn.Linear) == 1
    has_norm = options.get("batch_norm", False)
    assert (nn.BatchNorm2d in kinds) == has_norm
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d)) == has_norm
    assert MODELS["wrn18"] is wide_resnet18 and MODELS["vgg11"] is vgg11
    assert TASKS["wrn18"] == TASKS["vgg11"] == "classification"


def test_paper_scale_sizes_and_bad_width():
    assert sum(p.numel() for p in build_model("wrn18").parameters()) == 11_173_962
    assert sum(p.numel() for p in build_model("vgg11").parameters()) == 9_225_610
    with pytest.raises(ValueError, match="width must be a positive integer, got 0"):
        wide_resnet18(width=0)


def test_resnet_without_batchnorm_starts_with_identity_blocks():
    torch.manual_seed(0)
    model = wide_resnet18(width=4, batch_norm=False)
    with torch.no_grad():
        logits = model(_batch(8)[0])
    assert logits.abs().max() < 20  # He init alone would blow up through 8 residual sums


def _norm_names(model):
    return {
        f"{module_name}.{name}"
        for module_name, module in model.named_modules()
        if isinstance(module, nn.BatchNorm2d)
        for name, _ in module.named_parameters()
    }


def test_train_norm_false_freezes_only_batchnorm():
    model = wide_resnet18(width=4, train_norm=False)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == _norm_names(model) and len(frozen) == 2 * 20


# -- FOOF and KFAC on the conv nets ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["sgd", "foof", "kfac"])
@pytest.mark.parametrize("model_name", ["wrn18-bn", "vgg11"])
def test_steps_train_layers_and_leave_frozen_batchnorm_alone(name, model_name):
    torch.manual_seed(0)
    if model_name == "vgg11":
        model = vgg11(width=4)
    else:  # App. D.6: BatchNorm trained by SGD only
        model = wide_resnet18(width=4, batch_norm=True, train_norm=name == "sgd")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    norm = _norm_names(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no parameter may fall back to plain SGD silently
        extra = {} if name == "sgd" else {"inv_every": 2, "stats_steps": 1}
        optimizer = build_optimizer(name, model, **HYPERPARAMETERS[name], **extra)
    for seed in range(3):
        x, y = _batch(seed=seed)
        optimizer.zero_grad()
        output = model(x)
        loss = nn.functional.cross_entropy(output, y)
        assert torch.isfinite(loss)
        backward(optimizer, loss, output)
        optimizer.step()
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n
        moved = not torch.equal(p, before[n])
        expected = name == "sgd" if n in norm else True
        assert moved == expected, f"{n}: moved={moved} under {name}"


# -- augmentation --------------------------------------------------------------------------------


def _is_crop_or_flipped_crop(out, image, padding):
    padded = nn.functional.pad(image, (padding,) * 4)
    h, w = image.shape[-2:]
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            if torch.equal(out, crop) or torch.equal(out, crop.flip(-1)):
                return True
    return False


def test_augment_batch_crops_flips_and_is_seeded():
    images = torch.randn(16, 3, 8, 8)
    out = augment_batch(images, torch.Generator().manual_seed(0), padding=2)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert all(_is_crop_or_flipped_crop(out[i], images[i], 2) for i in range(16))
    again = augment_batch(images, torch.Generator().manual_seed(0), padding=2)
    other = augment_batch(images, torch.Generator().manual_seed(1), padding=2)
    assert torch.equal(out, again) and not torch.equal(out, other)
    assert not torch.equal(out, images)
    with pytest.raises(ValueError, match=r"needs images \(B, C, H, W\)"):
        augment_batch(torch.zeros(4, 8), torch.Generator())


# -- training details of App. D.6 -----------------------------------------------------------------


def _config(**overrides):
    values = dict(
        dataset="fake-cifar10",
        model="vgg11",
        model_options={"width": 2},
        optimizer="sgd",
        lr=0.01,
        momentum=0.9,
        subset=64,
        batch_size=32,
        epochs=2,
        eval_every_epoch=True,
    )
    values.update(overrides)
    return TrainConfig(**values)


def test_augmented_training_is_reproducible_and_differs():
    plain = train(_config(), progress=False)
    augmented = train(_config(augment=True), progress=False)
    again = train(_config(augment=True), progress=False)
    assert augmented["steps"]["loss"] == again["steps"]["loss"]
    assert augmented["steps"]["loss"][1:] != plain["steps"]["loss"][1:]
    assert augmented["config"]["augment"] is True


def test_momentum_is_switched_on_after_the_first_epoch():
    class Record(TrainCallback):
        def __init__(self):
            self.seen = []

        def before_step(self, context):
            self.seen.append((context.epoch, context.optimizer.param_groups[0]["momentum"]))

    record = Record()
    delayed = train(_config(momentum_delay=1), progress=False, callbacks=[record])
    assert record.seen == [(1, 0.0), (1, 0.0), (2, 0.9), (2, 0.9)]
    no_momentum = train(_config(momentum=0.0), progress=False)
    full = train(_config(), progress=False)
    # epoch 1 is plain SGD; epoch 2 continues with momentum (a buffer started afresh)
    assert delayed["steps"]["loss"][:3] == no_momentum["steps"]["loss"][:3]
    assert delayed["steps"]["loss"][2:] != full["steps"]["loss"][2:]
    assert delayed["config"]["momentum"] == 0.9 and delayed["config"]["momentum_delay"] == 1


def test_delayed_momentum_leaves_adam_alone():
    optimizer = torch.optim.Adam(nn.Linear(2, 2).parameters())
    callback = DelayedMomentum(1)

    class Context:
        epoch = 1

    Context.optimizer = optimizer
    callback.before_step(Context)
    assert "momentum" not in optimizer.param_groups[0]


def test_polyak_average_matches_the_formula_and_is_swapped_in_for_evaluation():
    model = nn.Linear(3, 2)
    decay = 0.8
    averaging = PolyakAveraging(model, decay)
    history = []
    for step in range(1, 5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(float(step))
        history.append([p.detach().clone() for p in model.parameters()])
        averaging.after_step(None)
    current = [p.detach().clone() for p in model.parameters()]
    # bias-corrected EMA = weighted mean of the iterates with weights ∝ decay^(t - s)
    weights = torch.tensor([decay ** (3 - s) for s in range(4)], dtype=torch.float64)
    weights /= weights.sum()
    for i, p in enumerate(model.parameters()):
        expected = sum(w * h[i].double() for w, h in zip(weights, history))
        with averaging.evaluation(model):
            torch.testing.assert_close(p.detach().double(), expected, rtol=1e-6, atol=1e-6)
        assert torch.equal(p.detach(), current[i])  # restored afterwards
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\), got 1.0"):
        PolyakAveraging(model, 1.0)


def test_polyak_averaging_changes_only_evaluation():
    plain = train(_config(), progress=False)
    zero = train(_config(polyak_decay=0.0), progress=False)
    averaged = train(_config(polyak_decay=0.9, eval_train=True), progress=False)
    assert plain["steps"]["loss"] == zero["steps"]["loss"] == averaged["steps"]["loss"]
    assert zero["epochs"]["test_loss"] == pytest.approx(plain["epochs"]["test_loss"], rel=1e-6)
    assert averaged["epochs"]["test_loss"] != pytest.approx(plain["epochs"]["test_loss"])
    assert averaged["initial"] == plain["initial"]
    with pytest.raises(ConfigError, match="polyak_decay must be in"):
        train(_config(polyak_decay=1.5), progress=False)


def test_foof_and_kfac_train_a_batchnorm_resnet_with_every_d6_detail():
    for name in ("foof", "kfac"):
        config = _config(
            model="wrn18",
            model_options={"width": 2, "batch_norm": True, "train_norm": False},
            optimizer=name,
            **{k: v for k, v in HYPERPARAMETERS[name].items()},
            inv_every=2,
            stats_steps=1,
            augment=True,
            momentum_delay=1,
            polyak_decay=0.9,
        )
        results = train(config, progress=False)
        assert not results["diverged"] and len(results["steps"]["loss"]) == 4
        assert all(v is not None for v in results["epochs"]["test_loss"])


# -- benchmark ---------------------------------------------------------------------------------


def test_wrn_timing_suite_on_a_tiny_network():
    results = time_wrn(width=2, batch_size=4, inv_every=4, stats_steps=2, steps=2)
    methods = results["methods"]
    assert set(methods) == {"sgd", "foof", "kfac"}
    assert methods["sgd"]["ratio"] == 1.0
    foof = methods["foof"]
    assert set(foof["times"]) == {"plain", "stats", "inversion"}
    expected = 2 * foof["median"]["plain"] + foof["median"]["stats"] + foof["median"]["inversion"]
    assert foof["amortised"] == pytest.approx(expected / 4)
    table = format_wrn(results)
    assert "| FOOF |" in table and "ratio to SGD" in table


def test_callback_states_round_trip():
    model = nn.Linear(3, 2)
    averaging = PolyakAveraging(model, 0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    averaging.after_step(None)
    restored = PolyakAveraging(nn.Linear(3, 2), 0.9)
    restored.load_state_dict(averaging.state_dict())
    assert restored.steps == 1 and restored.decay == 0.5
    assert all(torch.equal(a, b) for a, b in zip(restored.averages, averaging.averages))
    delayed = DelayedMomentum(2)
    delayed._momentum = [0.9]
    other = DelayedMomentum(0)
    other.load_state_dict(delayed.state_dict())
    assert other.epochs == 2 and other._momentum == [0.9]
