import pytest
import torch
from torch import nn

from foof.fisher import LaplacePosterior, SubsampledFisher
from tests.cases import CASE_IDS, CASES
from tests.reference import (
    dense_fisher,
    flatten_layer_matrices,
    mc_labels,
    per_sample_output_jacobians,
)

TOL = dict(rtol=1e-8, atol=1e-12)  # float64


def dense_g(model, x, fisher, labels):
    """Columns g_{k,i}/√B of G (k-major), from per-sample Jacobians."""
    jac = per_sample_output_jacobians(model, x)  # (B, C, P)
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1)
    classes = probs.shape[1]
    if fisher == "full":
        eye = torch.eye(classes, dtype=probs.dtype)
        residuals = [probs[:, k : k + 1].sqrt() * (probs - eye[k]) for k in range(classes)]
    else:
        residuals = [probs - nn.functional.one_hot(labels, classes).to(probs.dtype)]
    cols = [torch.einsum("bc,bcp->bp", r, jac) for r in residuals]
    return torch.cat(cols).T / len(x) ** 0.5  # (P, K·B)


def dense_order(model, f, vector):
    """A foof vector (flat in parameter order, or a list) in the references' [W|b] row order."""
    params = f.parameters()
    if isinstance(vector, torch.Tensor):
        vector = [
            t.reshape(p.shape)
            for t, p in zip(torch.split(vector, [p.numel() for p in params]), params)
        ]
    names = {id(p): n for n, p in model.named_parameters()}
    return flatten_layer_matrices(model, {names[id(p)]: t for p, t in zip(params, vector)})


def random_vector(f, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(
        sum(p.numel() for p in f.parameters()), dtype=torch.float64, generator=generator
    )


def build(case, fisher, block=False):
    model = case.model()
    x, y = case.batch()
    labels = {"full": None, "mc": mc_labels(model, x, 3), "empirical": y}[fisher]
    generator = torch.Generator().manual_seed(3)
    f = SubsampledFisher(model, x, y, fisher=fisher, block_diagonal=block, generator=generator)
    return model, x, labels, f


def block_mask(f, size):
    mask = torch.zeros(size, size, dtype=torch.bool)
    start = 0
    for m in f.layers:
        n = sum(p.numel() for p in m.parameters(recurse=False))
        mask[start : start + n, start : start + n] = True
        start += n
    return mask


@pytest.mark.parametrize("fisher", ["full", "mc", "empirical"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_products_equal_dense_definitions(case, fisher):
    model, x, labels, f = build(case, fisher)
    dense = dense_fisher(model, x, labels)
    g = dense_g(model, x, fisher, labels)
    torch.testing.assert_close(g @ g.T, dense, **TOL)
    torch.testing.assert_close(f.gram(), g.T @ g, **TOL)
    v = random_vector(f, 0)
    dv = dense_order(model, f, v)
    torch.testing.assert_close(dense_order(model, f, f.mv(v)), dense @ dv, **TOL)
    torch.testing.assert_close(f.quadratic(v), dv @ dense @ dv, **TOL)
    damping = 0.1
    expected = torch.linalg.solve(dense + damping * torch.eye(len(dense), dtype=dense.dtype), dv)
    torch.testing.assert_close(dense_order(model, f, f.inverse_mv(v, damping)), expected, **TOL)
    # parameter-shaped lists give the same numbers, as lists
    params = f.parameters()
    as_list = [
        t.reshape(p.shape) for t, p in zip(torch.split(v, [p.numel() for p in params]), params)
    ]
    out = f.mv(as_list)
    assert [o.shape for o in out] == [p.shape for p in params]
    torch.testing.assert_close(dense_order(model, f, out), dense @ dv, **TOL)


@pytest.mark.parametrize("case", CASES[:4], ids=CASE_IDS[:4])
def test_block_diagonal_products(case):
    model, x, labels, f = build(case, "full", block=True)
    dense = dense_fisher(model, x, None)
    dense = dense * block_mask(f, len(dense))
    v = random_vector(f, 1)
    dv = dense_order(model, f, v)
    torch.testing.assert_close(dense_order(model, f, f.mv(v)), dense @ dv, **TOL)
    torch.testing.assert_close(f.quadratic(v), dv @ dense @ dv, **TOL)
    expected = torch.linalg.solve(dense + 0.2 * torch.eye(len(dense), dtype=dense.dtype), dv)
    torch.testing.assert_close(dense_order(model, f, f.inverse_mv(v, 0.2)), expected, **TOL)


def test_parameters_gradients_untouched_and_memory_is_batch_times_neurons():
    from foof.models import mlp

    model = mlp()
    x = torch.randn(100, 1, 28, 28)
    f = SubsampledFisher(model, x, fisher="mc")
    assert all(p.grad is None for p in model.parameters())
    num_params = sum(p.numel() for p in model.parameters())
    stored = [t for d in f.data for t in (d.inputs, d.output_grads)]
    for t in stored:
        assert t.numel() <= 100 * 1000, t.shape  # rows × neurons, never params-sized
        assert num_params not in t.shape
    v = [torch.randn_like(p) for p in f.parameters()]
    assert f.quadratic(v) > 0
    assert f.gram().shape == (100, 100)


def laplace_case():
    case = CASES[0]  # linear with biases
    model = case.model()
    x, y = case.batch()
    f = SubsampledFisher(model, x, fisher="full")
    taus = [2.0, 0.5]
    posterior = LaplacePosterior(f, taus, num_data=50)
    dense = dense_fisher(model, x, None)
    prior = torch.cat(
        [
            torch.full(
                (sum(p.numel() for p in m.parameters(recurse=False)),), t, dtype=torch.float64
            )
            for m, t in zip(f.layers, taus)
        ]
    )
    precision = torch.diag(prior) + 50 * dense
    return posterior, f, precision, model


def test_laplace_sampling_map_has_exact_covariance():
    """x(y, z) is linear: its dense matrix T gives Cov(θ) = T Tᵀ, which must equal Λ⁻¹."""
    posterior, f, precision, _ = laplace_case()
    shapes = [(d.output_grads.shape[-1], d.inputs.shape[1]) for d in f.data]
    sizes = [a * b for a, b in shapes]
    num_y, num_z = sum(sizes), f.data[0].num_columns
    columns = []
    for j in range(num_y + num_z):
        basis = torch.zeros(num_y + num_z, dtype=torch.float64)
        basis[j] = 1
        y = [t.reshape(s) for t, s in zip(torch.split(basis[:num_y], sizes), shapes)]
        out = posterior.sample_displacements(y, basis[num_y:])
        columns.append(torch.cat([o.reshape(-1) for o in out]))
    transform = torch.stack(columns, dim=1)
    torch.testing.assert_close(transform @ transform.T, torch.linalg.inv(precision), **TOL)


def test_laplace_samples_have_the_posterior_covariance_statistically():
    posterior, f, precision, model = laplace_case()
    generator = torch.Generator().manual_seed(0)
    centre = dense_order(model, f, [p.detach() for p in f.parameters()])
    samples = torch.stack([dense_order(model, f, s) for s in posterior.sample(4000, generator)])
    covariance = torch.cov((samples - centre).T, correction=0)
    expected = torch.linalg.inv(precision)
    # 4,000 samples: relative error of a covariance entry ~ sqrt(2/4000) ≈ 2%; allow 10% of scale
    scale = expected.diagonal().max()
    assert (covariance - expected).abs().max() < 0.1 * scale
    assert (samples.mean(0) - centre).abs().max() < 0.1 * scale**0.5


def test_predictive_restores_parameters_and_is_a_distribution():
    posterior, f, _, model = laplace_case()
    before = [p.detach().clone() for p in f.parameters()]
    x, _ = CASES[0].batch()
    probs = posterior.predictive(model, x, num_samples=3)
    for p, q in zip(f.parameters(), before):
        assert torch.equal(p, q)
    torch.testing.assert_close(probs.sum(1), torch.ones(len(x), dtype=torch.float64))


@pytest.mark.parametrize("second_factor", [True, False])
def test_kronecker_laplace_samples_have_the_kronecker_covariance(second_factor):
    from foof.fisher import KroneckerLaplace

    torch.manual_seed(0)
    layer = nn.Linear(3, 2).double()
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(5, 4, generator=generator, dtype=torch.float64)
    g = torch.randn(5, 2, generator=generator, dtype=torch.float64)
    input_cov, gradient_cov = a.T @ a / 5, g.T @ g / 5
    posterior = KroneckerLaplace(
        [layer], [(input_cov, gradient_cov)], 2.0, num_data=10, second_factor=second_factor
    )
    second = gradient_cov if second_factor else torch.eye(2, dtype=torch.float64)
    # column-stacking vec of [W | b]: precision N (Ā ⊗ Ḡ) + τ I
    precision = 10 * torch.kron(input_cov, second) + 2.0 * torch.eye(8, dtype=torch.float64)
    samples = posterior.sample(20000, torch.Generator().manual_seed(1))
    centre = torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], 1)
    flat = torch.stack([(torch.cat([w, b[:, None]], 1) - centre).T.reshape(-1) for w, b in samples])
    covariance = flat.T @ flat / len(flat)
    expected = torch.linalg.inv(precision)
    assert (covariance - expected).abs().max() < 0.05 * expected.diagonal().max()
