"""Dense references built independently of foof's capture, with ``torch.func``.

The input rows ``ā`` of a layer are recovered from the Jacobian of the layer's output with respect
to its weight (the layer is linear in ``[W, b]``), never from ``F.unfold``; gradients come from
``torch.func.grad``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev


def layer_input_rows(layer: nn.Module, layer_input: Tensor) -> Tensor:
    """Rows ``ā`` (one per sample and output position), bias column appended: ``(R, in_dim)``.

    ``output[n, o, pos] = Σ_j W[o, j] ā[n, pos, j] + b[o]``, so ``ā[n, pos] = ∂ output[n, 0, pos] /
    ∂ W[0, :]`` and the bias column is ``∂ output[n, 0, pos] / ∂ b[0] = 1``.
    """
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def first_output_channel(p: dict[str, Tensor]) -> Tensor:
        out = functional_call(layer, p, (layer_input,))
        return out[:, 0] if out.dim() == 2 else out[:, 0].flatten(1)  # (N,) or (N, positions)

    jac = jacrev(first_output_channel)(params)
    sample_dims = jac["weight"].dim() - layer.weight.dim()  # (N,) for Linear, (N, pos) for Conv2d
    rows = jac["weight"].select(sample_dims, 0).reshape(-1, layer.weight[0].numel())
    if "bias" in jac:
        rows = torch.cat([rows, jac["bias"].select(sample_dims, 0).reshape(-1, 1)], dim=1)
    return rows


def layer_inputs(model: nn.Module, x: Tensor) -> dict[nn.Module, Tensor]:
    """The input tensor of each Linear/Conv2d layer in one forward pass."""
    seen: dict[nn.Module, Tensor] = {}
    handles = [
        m.register_forward_hook(lambda m, args, out: seen.__setitem__(m, args[0].detach()))
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def gradient_matrices(model: nn.Module, loss_fn, x: Tensor, y: Tensor) -> dict[nn.Module, Tensor]:
    """``Ĝ = [∇W, ∇b]`` per layer from ``torch.func.grad`` of ``loss_fn(model(x), y)``."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    grads = torch.func.grad(lambda p: loss_fn(functional_call(model, p, (x,)), y))(params)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            prefix = f"{name}." if name else ""
            g = grads[f"{prefix}weight"].flatten(1)
            if module.bias is not None:
                g = torch.cat([g, grads[f"{prefix}bias"][:, None]], dim=1)
            out[module] = g
    return out


def supported_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Linear/Conv2d layers with their qualified names, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def flatten_layer_matrices(model: nn.Module, tensors: dict[str, Tensor]) -> Tensor:
    """Concatenate per-layer ``[W, b]`` matrices (from a name → tensor dict) row-major.

    ``tensors`` may carry leading batch dimensions: ``(..., *param.shape)`` per parameter.
    """
    parts = []
    for name, module in supported_layers(model):
        prefix = f"{name}." if name else ""
        w = tensors[f"{prefix}weight"]
        lead = w.shape[: w.dim() - module.weight.dim()]
        mat = w.reshape(*lead, module.weight.shape[0], -1)
        if module.bias is not None:
            mat = torch.cat([mat, tensors[f"{prefix}bias"].unsqueeze(-1)], dim=-1)
        parts.append(mat.reshape(*lead, -1))
    return torch.cat(parts, dim=-1)


def per_sample_output_jacobians(model: nn.Module, x: Tensor) -> Tensor:
    """``J_i = ∂ f(x_i) / ∂ θ`` for every sample: ``(B, C, num_params)``, layer-matrix order."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    jac = torch.func.vmap(jacrev(f), in_dims=(None, 0))(params, x)
    return flatten_layer_matrices(model, jac)


def dense_fisher(
    model: nn.Module, x: Tensor, labels: Tensor | None, likelihood: str = "categorical"
) -> Tensor:
    """Explicit ``F = (1/B) Σ_i E[g gᵀ]``; ``labels=None``: exact expectation, else at labels."""
    jac = per_sample_output_jacobians(model, x)  # (B, C, P)
    with torch.no_grad():
        out = model(x)
    if likelihood == "gaussian":
        if labels is None:
            output_fisher = torch.eye(out.shape[1], dtype=out.dtype).expand(len(x), -1, -1)
            return torch.einsum("bcp,bcd,bdq->pq", jac, output_fisher, jac) / len(x)
        residual = labels  # per-sample output gradient given directly
        g = torch.einsum("bc,bcp->bp", residual, jac)
        return g.T @ g / len(x)
    probs = torch.softmax(out, dim=1)
    if labels is None:
        output_fisher = torch.diag_embed(probs) - probs.unsqueeze(2) * probs.unsqueeze(1)
        return torch.einsum("bcp,bcd,bdq->pq", jac, output_fisher, jac) / len(x)
    residual = probs - nn.functional.one_hot(labels, out.shape[1]).to(probs.dtype)
    g = torch.einsum("bc,bcp->bp", residual, jac)
    return g.T @ g / len(x)


def flat_gradient(model: nn.Module, loss_fn, x: Tensor, y: Tensor) -> Tensor:
    """``∇L`` in layer-matrix order."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    grads = torch.func.grad(lambda p: loss_fn(functional_call(model, p, (x,)), y))(params)
    return flatten_layer_matrices(model, grads)


def layer_output_gradients(
    model: nn.Module, x: Tensor, logit_grads: Tensor
) -> dict[nn.Module, Tensor]:
    """Rows ``(rows, out)`` per layer of ``∂/∂(layer output) Σ_i ⟨logit_grads_i, f(x_i)⟩``."""
    outputs: dict[nn.Module, Tensor] = {}
    handles = [
        m.register_forward_hook(lambda m, a, o: outputs.__setitem__(m, o))
        for _, m in supported_layers(model)
    ]
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    layers = list(outputs)
    grads = torch.autograd.grad(out, [outputs[m] for m in layers], grad_outputs=logit_grads)
    result = {}
    for m, g in zip(layers, grads):
        result[m] = g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2).reshape(-1, g.shape[1])
    return result


def mc_labels(model: nn.Module, x: Tensor, seed: int) -> Tensor:
    """The labels foof's MC sampler draws with ``seed`` on its first step (same generator use)."""
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1)
    return torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed)).squeeze(1)
