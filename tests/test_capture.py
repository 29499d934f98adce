import pytest
import torch
from torch import nn

from foof.capture import Capture, input_rows, is_supported, unsupported_parameters
from tests.cases import CASE_IDS, CASES
from tests.reference import layer_input_rows, layer_inputs


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_input_rows_match_jacobian_of_layer(case):
    """Unfolded rows (bias column included) equal rows recovered from d output / d weight."""
    model = case.model()
    x, _ = case.batch()
    for layer, layer_input in layer_inputs(model, x).items():
        expected = layer_input_rows(layer, layer_input)
        torch.testing.assert_close(input_rows(layer, layer_input), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_output_grads_are_gradients_wrt_layer_outputs(case):
    model = case.model()
    x, y = case.batch()
    outputs = {}
    handles = [
        m.register_forward_hook(lambda m, a, out: outputs.__setitem__(m, out))
        for m in model.modules()
        if is_supported(m)
    ]
    with Capture(model) as capture:
        loss = nn.functional.cross_entropy(model(x), y)
        for h in handles:
            h.remove()
        layers = list(outputs)
        with capture.paused_grads():
            expected = torch.autograd.grad(loss, [outputs[m] for m in layers], retain_graph=True)
        loss.backward()
        for layer, grad in zip(layers, expected):
            rows = capture.output_grads(layer)
            channels = grad.shape[1]
            ref = grad.reshape(grad.shape[0], channels, -1).transpose(1, 2).reshape(-1, channels)
            torch.testing.assert_close(rows, ref, rtol=0, atol=0)


def test_no_capture_in_eval_or_no_grad():
    model = CASES[0].model()
    x, _ = CASES[0].batch()
    with Capture(model) as capture:
        with torch.no_grad():
            model(x)
        model.eval()
        model(x).sum().backward()
        assert all(capture.inputs(m) is None for m in capture.layers.values())
        assert all(capture.output_grads(m) is None for m in capture.layers.values())
        model.train()
        model(x).sum().backward()
        assert all(capture.inputs(m) is not None for m in capture.layers.values())


def test_repeated_forward_accumulates_rows_and_clear_forgets():
    model = nn.Linear(4, 2)
    with Capture(model) as capture:
        model(torch.randn(3, 4)).sum().backward()
        model(torch.randn(5, 4)).sum().backward()
        assert capture.inputs(model).shape == (8, 5)
        assert capture.output_grads(model).shape == (8, 2)
        capture.clear()
        assert capture.inputs(model) is None


def test_close_removes_hooks_and_gc_collects_forgotten_capture():
    model = nn.Linear(4, 2)
    capture = Capture(model)
    assert len(model._forward_hooks) == 1
    capture.close()
    assert len(model._forward_hooks) == 0
    for _ in range(3):
        Capture(model)  # dropped at once: its hooks must not pile up forever
    import gc

    gc.collect()
    model(torch.randn(2, 4))  # a dead capture's hook is a no-op
    assert len(model._forward_hooks) == 0


def test_in_place_activation_after_layer():
    """A tensor hook on the output survives an in-place ReLU (a module backward hook would not)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))
    with Capture(model) as capture:
        model(torch.randn(5, 3)).sum().backward()
        assert capture.output_grads(model[0]).shape == (5, 4)


def test_supported_and_unsupported():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, groups=2), nn.Flatten()
    )
    assert is_supported(model[0]) and not is_supported(model[2])
    assert set(unsupported_parameters(model)) == {"1.weight", "1.bias", "2.weight", "2.bias"}


def test_rows_of_e_and_a_pair_up_under_gradient_accumulation():
    # one backward per forward: E must come back in forward-call order, so that EᵀA is the
    # accumulated weight gradient (float64, exact up to rounding)
    torch.manual_seed(0)
    layer = nn.Linear(3, 2).double()
    with Capture(layer) as capture:
        for n in (4, 1, 2):
            layer(torch.randn(n, 3, dtype=torch.float64)).pow(2).sum().backward()
        assert capture.calls_pair_up(layer)
        gradient = capture.output_grads(layer).T @ capture.inputs(layer)
        paired_e, paired_a = capture.paired_rows(layer)
    expected = torch.cat([layer.weight.grad, layer.bias.grad.unsqueeze(1)], dim=1)
    torch.testing.assert_close(gradient, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(paired_e.T @ paired_a, expected, rtol=1e-12, atol=1e-12)
