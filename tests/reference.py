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
        if isinstance(layer, nn.Linear):  # (N, ..., out): channels last
            return out[..., 0]
        return out[:, 0] if out.dim() == 2 else out[:, 0].flatten(1)  # (N,) or (N, positions)

    jac = jacrev(first_output_channel)(params)
    # (N,) or (N, ...) for Linear, (N, pos) for Conv2d
    sample_dims = jac["weight"].dim() - layer.weight.dim()
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
        if isinstance(m, nn.Linear):  # (N, ..., out): channels last
            result[m] = g.reshape(-1, g.shape[-1])
        else:
            result[m] = (
                g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2).reshape(-1, g.shape[1])
            )
    return result


def mc_labels(model: nn.Module, x: Tensor, seed: int) -> Tensor:
    """The labels foof's MC sampler draws with ``seed`` on its first step (same generator use)."""
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1)
    return torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed)).squeeze(1)


# -- any likelihood, any output (B, ..., C): the conventions of foof.curvature.sampling ------------
def as_rows(output: Tensor) -> Tensor:
    """``(B, P, C)``: an output ``(B,)``, ``(B, C)`` or ``(B, ..., C)`` as rows per sample."""
    if output.dim() == 1:
        return output.reshape(-1, 1, 1)
    return output.reshape(output.shape[0], -1, output.shape[-1])


def output_fisher_matrices(output: Tensor, likelihood: str) -> Tensor:
    """``Λ`` per row ``(B, P, C, C)``: the Hessian of ``−log p`` w.r.t. the row, by autograd."""
    rows = as_rows(output.detach())

    def negative_log_likelihood(row: Tensor, target: Tensor) -> Tensor:
        if likelihood == "categorical":
            return -(torch.log_softmax(row, -1) * target).sum()
        if likelihood == "bernoulli":
            return nn.functional.binary_cross_entropy_with_logits(row, target, reduction="sum")
        return 0.5 * (row - target).square().sum()

    # the Hessian does not depend on the label for these likelihoods: take any valid one
    target = torch.full_like(rows, 1.0 / rows.shape[-1]) if likelihood != "gaussian" else rows
    # reverse over reverse: torch.func.hessian's forward mode imports TorchScript decompositions
    hessian = torch.func.vmap(jacrev(jacrev(negative_log_likelihood)))
    flat = hessian(rows.reshape(-1, rows.shape[-1]), target.reshape(-1, rows.shape[-1]))
    return flat.reshape(*rows.shape, rows.shape[-1])


def label_residuals(output: Tensor, labels: Tensor, likelihood: str) -> Tensor:
    """``∂(−log p(y|f))/∂f`` at ``labels``, shaped like ``output``."""
    output = output.detach()
    if likelihood == "categorical":
        onehot = nn.functional.one_hot(labels, output.shape[-1]).to(output.dtype)
        return torch.softmax(output, -1) - onehot
    if likelihood == "bernoulli":
        return torch.sigmoid(output) - labels.to(output.dtype)
    return output - labels.to(output.dtype)


def mc_residuals(output: Tensor, likelihood: str, generator: torch.Generator) -> Tensor:
    """The output gradients foof's MC sampler draws from ``generator`` (same generator use)."""
    rows = as_rows(output.detach())
    flat = rows.reshape(-1, rows.shape[-1])
    if likelihood == "gaussian":
        noise = torch.randn(flat.shape, generator=generator, dtype=flat.dtype)
        return noise.reshape(output.shape)
    if likelihood == "categorical":
        probs = torch.softmax(flat, -1)
        labels = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        target = nn.functional.one_hot(labels, flat.shape[-1]).to(flat.dtype)
    else:
        probs = torch.sigmoid(flat)
        target = torch.bernoulli(probs, generator=generator)
    return (probs - target).reshape(output.shape)


def convention_loss(output: Tensor, target: Tensor, likelihood: str) -> Tensor:
    """The loss foof's likelihoods assume: the mean over all ``B·P`` rows of ``−log p``."""
    rows = as_rows(output)
    count = rows.shape[0] * rows.shape[1]
    if likelihood == "categorical":
        return nn.functional.cross_entropy(rows.reshape(count, -1), target.reshape(-1))
    target = target.reshape(rows.shape).to(rows.dtype)
    if likelihood == "bernoulli":
        total = nn.functional.binary_cross_entropy_with_logits(rows, target, reduction="sum")
        return total / count
    return 0.5 * (rows - target).square().sum() / count


def dense_general_fisher(
    model: nn.Module, x: Tensor, likelihood: str, residuals: Tensor | None = None
) -> Tensor:
    """``F = (1/(B·P)) Σ_i E[g_i gᵀ_i]`` in layer-matrix order, ``g_i`` the sample's summed score.

    ``residuals=None``: the exact expectation ``(1/(B·P)) Σ_{i,t} J_itᵀ Λ_it J_it``; else the
    output gradients ``(B, ..., C)`` at some labels: ``g_i = Σ_t J_itᵀ r_it``.
    """
    with torch.no_grad():
        out = model(x)
    jac = per_sample_output_jacobians(model, x)  # (B, *out[1:], params)
    batch, positions, classes = as_rows(out).shape
    jac = jac.reshape(batch, positions, classes, -1)
    rows = batch * positions
    if residuals is None:
        fisher = output_fisher_matrices(out, likelihood)
        return torch.einsum("btcp,btcd,btdq->pq", jac, fisher, jac) / rows
    g = torch.einsum("btc,btcp->bp", as_rows(residuals), jac)
    return g.T @ g / rows


def kfac_general_factors(
    model: nn.Module, x: Tensor, likelihood: str, residuals: Tensor | None = None
) -> tuple[dict[nn.Module, Tensor], dict[nn.Module, Tensor]]:
    """KFAC's ``Ā`` (mean over rows of ``ā āᵀ``) and ``Ḡ = (1/(B·P)) Σ_terms Σ_rows e eᵀ``.

    Full Fisher: one backward pass per row ``t`` and column of a square root of ``Λ_t``
    (by ``eigh``), zero on the other rows; else one pass of ``residuals``.
    """
    with torch.no_grad():
        out = model(x)
    batch, positions, classes = as_rows(out).shape
    if residuals is None:
        values, vectors = torch.linalg.eigh(output_fisher_matrices(out, likelihood))
        root = vectors * values.clamp_min(0).sqrt().unsqueeze(-2)  # (B, P, C, C): S Sᵀ = Λ
        terms = []
        for t in range(positions):
            for k in range(classes):
                term = torch.zeros(batch, positions, classes, dtype=out.dtype)
                term[:, t] = root[:, t, :, k]
                terms.append(term.reshape(out.shape))
    else:
        terms = [residuals]
    gradient_cov: dict[nn.Module, Tensor] = {}
    for term in terms:
        for layer, rows in layer_output_gradients(model, x, term).items():
            gradient_cov[layer] = gradient_cov.get(layer, 0) + rows.T @ rows / (batch * positions)
    input_cov = {}
    for layer, inp in layer_inputs(model, x).items():
        rows = layer_input_rows(layer, inp)
        input_cov[layer] = rows.T @ rows / rows.shape[0]
    return input_cov, gradient_cov


def fisher_residuals(
    model: nn.Module, x: Tensor, y: Tensor, fisher: str, likelihood: str, seed: int
) -> Tensor | None:
    """The output gradients a Fisher type uses (``None``: the exact expectation, ``"full"``).

    ``"mc"``: those foof's sampler draws first from a generator seeded with ``seed``;
    ``"empirical"``: at the dataset labels ``y``.
    """
    with torch.no_grad():
        out = model(x)
    if fisher == "full":
        return None
    if fisher == "mc":
        return mc_residuals(out, likelihood, torch.Generator().manual_seed(seed))
    return label_residuals(out, y, likelihood)


def flat_parameters(model: nn.Module) -> Tensor:
    """The model's Linear/Conv2d parameters in layer-matrix order, detached."""
    return flatten_layer_matrices(
        model, {k: v.detach().clone() for k, v in model.named_parameters()}
    )
