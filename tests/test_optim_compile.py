"""Curvature optimizers on a ``torch.compile``d model: the eager result, and no recompilations.

The capture's forward hook is opaque to dynamo (``torch.compiler.disable``): one graph break per
hooked layer, where the hook sees the layer's real input and output. Traced instead, it recorded
tensors of the compiled graph that the network output has no autograd path to (KFAC's ``Ḡ`` of
every layer but the last was silently 0) and guarded on the step counter (a recompilation per
step up to the recompile limit). Compiled with ``backend="aot_eager"`` (AOTAutograd's forward and
backward graphs without inductor's code generation, which is slow on a small CPU); float64, so the
compiled and the eager runs agree to round-off.
"""

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from foof import FOOF, KFAC, NaturalGradient

TOL = dict(rtol=1e-10, atol=1e-12)


class TinyGPT(nn.Module):
    """Embedding, a pre-norm causal self-attention block and an MLP: ``(B, T)`` → ``(B, T, V)``."""

    def __init__(self, vocab: int = 7, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.fc = nn.Linear(width, 2 * width)
        self.head = nn.Linear(2 * width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        q, k, v = self.qkv(self.norm1(h)).chunk(3, dim=-1)
        h = h + self.proj(nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
        return self.head(nn.functional.gelu(self.fc(self.norm2(h))))


def run(make, compiled, steps=3):
    """Parameters after ``steps`` per-token-loss steps, and the compiled frames after each."""
    torch.manual_seed(0)
    model = TinyGPT().double()
    counter = CompileCounterWithBackend("aot_eager")
    forward = torch.compile(model, backend=counter) if compiled else model
    with pytest.warns(UserWarning, match="fallback optimizer AdamW"):  # embedding and norms
        opt = make(model)
    generator = torch.Generator().manual_seed(1)
    frames = []
    for _ in range(steps):
        tokens = torch.randint(0, 7, (3, 5), generator=generator)
        targets = torch.randint(0, 7, (3, 5), generator=generator)
        opt.zero_grad()
        logits = forward(tokens)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        opt.backward(loss, logits)
        opt.step()
        frames.append(counter.frame_count)
    return [p.detach().clone() for p in model.parameters()], frames


OPTIMIZERS = {
    "foof": lambda m: FOOF(m, lr=0.1, damping=0.1),
    "kfac-mc": lambda m: KFAC(m, lr=0.1, damping=0.1, fisher="mc", seed=0),
    "kfac-full-standard": lambda m: KFAC(
        m, lr=0.1, damping=0.1, fisher="full", damping_mode="standard", low_rank=False
    ),
    "natural-mc": lambda m: NaturalGradient(m, lr=0.1, damping=0.1, fisher="mc", seed=0),
    "foof-reduce": lambda m: FOOF(m, lr=0.1, damping=0.1, kfac_approx="reduce"),
    "kfac-reduce": lambda m: KFAC(m, lr=0.1, damping=0.1, seed=0, kfac_approx="reduce"),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_compiled_model_trains_as_the_eager_one_without_recompiling(name):
    torch._dynamo.reset()
    try:
        eager, _ = run(OPTIMIZERS[name], compiled=False)
        compiled, frames = run(OPTIMIZERS[name], compiled=True)
    finally:
        torch._dynamo.reset()
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, **TOL)
    # every frame is compiled on the first step (graph breaks at the hooked layers, one
    # compilation per distinct layer shape); later steps reuse them all
    assert frames[0] > 0
    assert frames[-1] == frames[0], frames


@pytest.mark.parametrize("name", ["foof", "kfac-mc"])
def test_bf16_autocast_on_attention_keeps_float32_statistics(name):
    """Forward under bf16 autocast (the projections run in bf16): factors stay float32."""
    torch.manual_seed(0)
    model = TinyGPT()
    with pytest.warns(UserWarning, match="fallback optimizer AdamW"):
        opt = OPTIMIZERS[name](model)
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):
        tokens = torch.randint(0, 7, (3, 5), generator=generator)
        targets = torch.randint(0, 7, (3, 5), generator=generator)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(tokens)
            loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        assert model.qkv(torch.zeros(1, 8)).dtype == torch.float32  # autocast has ended
        opt.backward(loss, logits)
        opt.step()
    for _, _, state in opt.layer_items():
        for key in ("input_covariance", "gradient_covariance"):
            if key in state:
                assert state[key].dtype == torch.float32, key
                assert bool(torch.isfinite(state[key]).all()), key
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
