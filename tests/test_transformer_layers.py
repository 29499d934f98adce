"""Transformer building blocks: nn.MultiheadAttention is refused, tied weights follow one rule.

The rule (foof.capture.check_capturable): a Parameter shared by an unsupported module (an
``nn.Embedding``) and a supported layer is preconditioned by that layer's block with the sum
of the gradients of all its uses; two supported layers sharing one is refused. Dense reference:
``torch.func`` gradient of the tied Parameter and the head's input rows, float64, rtol 1e-8.
"""

import pytest
import torch
from torch import nn

from foof import FOOF, KFAC
from foof.capture import Capture

TOL = dict(rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.MultiheadAttention(8, 2, batch_first=True),
        lambda: nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True),
    ],
    ids=["mha", "encoder-layer"],
)
@pytest.mark.parametrize("optimizer", [FOOF, KFAC])
@pytest.mark.filterwarnings("ignore:.*plain SGD")
def test_multihead_attention_is_refused_with_the_alternative(make, optimizer):
    with pytest.raises(ValueError, match=r"nn\.MultiheadAttention.*nn\.Linear projections"):
        optimizer(make(), lr=0.1, damping=0.1)


class TiedLM(nn.Module):
    def __init__(self, vocab=6, width=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied: one Parameter (vocab, width)

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


def test_a_tied_weight_is_preconditioned_by_the_heads_block_with_both_gradients():
    torch.manual_seed(0)
    model = TiedLM().double()
    tokens = torch.randint(0, 6, (3, 5))
    targets = torch.randint(0, 6, (3, 5))
    lr, damping = 0.1, 0.05

    def loss_of(params):
        logits = torch.func.functional_call(model, params, (tokens,))
        return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

    params = {k: v.detach() for k, v in model.named_parameters()}
    tied_grad = torch.func.grad(loss_of)(params)["embed.weight"]  # both uses, summed
    with torch.no_grad():
        head_inputs = torch.tanh(model.mix(model.embed(tokens))).reshape(-1, 4)
    sigma = head_inputs.T @ head_inputs / head_inputs.shape[0]
    expected = torch.linalg.solve(sigma + damping * torch.eye(4, dtype=sigma.dtype), tied_grad.T).T
    before = model.embed.weight.detach().clone()
    opt = FOOF(model, lr=lr, damping=damping, ema_decay=0.0)  # no warning: nothing is left out
    assert opt.other_params == []
    opt.zero_grad()
    logits = model(tokens)
    nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    opt.step()
    torch.testing.assert_close((before - model.embed.weight.detach()) / lr, expected, **TOL)


def test_one_parameter_in_two_supported_layers_is_refused():
    first, second = nn.Linear(3, 3), nn.Linear(3, 3)
    second.weight = first.weight
    with pytest.raises(ValueError, match="share one Parameter"):
        Capture(nn.Sequential(first, nn.Tanh(), second))
