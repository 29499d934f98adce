"""Capture of per-layer statistics: layer inputs ``A`` and output gradients ``E``.

Every method in foof (FOOF, KFAC, subsampled natural gradients) is built on the same two
per-layer quantities of paper Sec. 2.2: the inputs ``A`` of a layer (one row per sample, or per
sample and spatial position for a convolution) and the gradients ``E`` of the loss with respect
to the layer's outputs. :class:`Capture` records them with hooks and nothing else; what to do with
them is the business of the curvature blocks and optimizers on top.

Conventions:
    * Rows. For ``nn.Linear`` a row is one sample (extra leading dims are folded into rows). For
      ``nn.Conv2d`` the input is unfolded into patches (Grosse & Martens, 2016), so a row is one
      (sample, output position) pair: ``A`` has shape ``(N * H_out * W_out, C_in * kh * kw)``
      and ``E`` has shape ``(N * H_out * W_out, C_out)``.
    * Weight sharing (Eschenhagen et al., NeurIPS 2023). A layer applied at several positions
      of a sample (``nn.Linear`` on ``(N, ..., d)``, a convolution's patches) has two
      Kronecker-factored approximations, chosen by ``kfac_approx``: ``"expand"`` (the default)
      treats every position as a row, as above; ``"reduce"`` first averages the inputs of each
      sample over its positions (and sums the output gradients over them, see
      :func:`output_rows`), so there is one row per sample. They agree when every sample has one
      position.
    * Bias. A layer with a bias gets a constant 1 appended to each input row (``ā`` in the paper),
      so the weight and the bias are preconditioned jointly as one matrix ``[W, b]``.
    * When. Hooks record only when the module is in training mode *and* autograd is enabled;
      forward passes under ``torch.no_grad()`` or in ``model.eval()`` leave everything untouched.
    * Scope. Records accumulate from every forward call since the last :meth:`Capture.clear`
      (gradient accumulation and a module used twice both just add rows). The optimizers clear
      them in ``step()``; their ``zero_grad()`` calls :meth:`Capture.mark` instead, so that the
      records of a forward pass survive a ``zero_grad`` between forward and backward, while a
      forward pass that follows a ``zero_grad`` starts afresh, as its gradients do.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)

KFAC_APPROXIMATIONS = ("expand", "reduce")
"""Weight-sharing flavours of the Kronecker factors (Eschenhagen et al., NeurIPS 2023, Sec. 3)."""


def is_supported(module: nn.Module) -> bool:
    """Whether foof preconditions ``module``: ``nn.Linear`` or an ungrouped ``nn.Conv2d``."""
    if isinstance(module, nn.Conv2d):
        return module.groups == 1
    return isinstance(module, nn.Linear)


def is_block(module: nn.Module) -> bool:
    """The layers of FOOF and KFAC: :func:`is_supported`'s, and a dense ``nn.Embedding``.

    An embedding is a Linear layer on one-hot inputs, ``out = Wᵀ onehot(t)`` with ``Wᵀ``
    ``(embedding_dim, num_embeddings)``, so its input second moment is *diagonal*, the token
    frequencies ``Σ = diag(c_v / R)`` over the ``R`` looked-up tokens: exact and ``O(R)`` to
    build, ``O(V)`` to invert. ``sparse=True`` embeddings (sparse gradients) are left out.
    """
    if isinstance(module, nn.Embedding):
        return not module.sparse
    return is_supported(module)


def block_layers(
    model: nn.Module, supported: Callable[[nn.Module], bool] = is_supported
) -> dict[str, nn.Module]:
    """The layers a method preconditions, by qualified name, after the tied-weight rule.

    An ``nn.Embedding`` whose weight another supported layer also holds (a head tied to the
    embedding) is not a block of its own: the weight is preconditioned by the other layer's
    block with the gradient of both uses (see :func:`check_capturable`).
    """
    layers = {name: m for name, m in model.named_modules() if supported(m)}
    held = {id(m.weight) for m in layers.values() if not isinstance(m, nn.Embedding)}
    return {
        name: m
        for name, m in layers.items()
        if not (isinstance(m, nn.Embedding) and id(m.weight) in held)
    }


def layer_bias(module: nn.Module) -> nn.Parameter | None:
    """The layer's bias, None without one (an ``nn.Embedding`` has no bias attribute)."""
    return getattr(module, "bias", None)


def layer_out_dim(module: nn.Module) -> int:
    """Columns of the output rows ``E``: ``out_features``, ``C_out`` or ``embedding_dim``."""
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    return module.weight.shape[0]


def weight_layout(module: nn.Module, direction: Tensor) -> tuple[list, Tensor]:
    """The parameters a layer's direction ``(out, in_dim)`` updates, and it in their layout.

    ``[W, b]`` and the joint matrix for Linear/Conv2d; ``[W]`` and ``directionᵀ``
    ``(num_embeddings, embedding_dim)`` for an embedding, whose weight is ``Wᵀ`` of the
    Linear convention.
    """
    if isinstance(module, nn.Embedding):
        return [module.weight], direction.T
    return [module.weight, layer_bias(module)], direction


def token_frequencies(module: nn.Embedding, inputs: list[Tensor]) -> tuple[Tensor, int]:
    """An embedding's diagonal input second moment: ``(c_v / R)_v`` and the ``R`` tokens.

    ``Σ = (1/R) Σ_r onehot(t_r) onehot(t_r)ᵀ = diag(c / R)`` with ``c_v`` the count of token ``v``
    among the ``R`` looked-up ids (``torch.bincount``): FOOF's ``Σ`` and KFAC's ``Ā`` exactly.
    """
    tokens = torch.cat([x.reshape(-1) for x in inputs])
    counts = torch.bincount(tokens, minlength=module.num_embeddings)
    rows = tokens.numel()
    # float32 at least (float64 for a float64 model), as every factor
    dtype = torch.promote_types(module.weight.dtype, torch.float32)
    return counts.to(dtype) / max(rows, 1), rows


def input_rows(module: nn.Module, inputs: Tensor, kfac_approx: str = "expand") -> Tensor:
    """Turn a layer's input into the rows ``ā`` of the paper, bias column included.

    Args:
        module: an ``nn.Linear`` or ``nn.Conv2d`` (``groups=1``).
        inputs: the tensor the layer was called with, ``(..., in_features)`` for Linear,
            ``(N, C_in, H, W)`` for Conv2d.
        kfac_approx: ``"expand"``: one row per sample and position; ``"reduce"``: one row per
            sample, the mean over its positions, ``ā_n = (1/P) Σ_p ā_{n,p}`` (KFAC-reduce,
            Eschenhagen et al., 2023, eq. 11). A Linear input ``(N, ..., d)`` has
            ``P = Π(...)`` positions per sample (the leading dim is the sample), a Conv2d's
            ``P = H_out·W_out``.

    Returns:
        ``(rows, in_dim)`` with ``in_dim = in_features (+1)`` for Linear and
        ``C_in * kh * kw (+1)`` for Conv2d; the trailing column of ones is present iff the
        layer has a bias. Column order matches ``weight.flatten(1)``. ``rows`` is ``N·P``
        (expand) or ``N`` (reduce).
    """
    reduce = kfac_approx == "reduce"
    if isinstance(module, nn.Embedding):  # one-hot rows; the optimizers use token_frequencies
        return F.one_hot(inputs.reshape(-1), module.num_embeddings).to(module.weight.dtype)
    if isinstance(module, nn.Conv2d):
        if any(module._reversed_padding_repeated_twice):
            # F.pad handles every padding_mode and the string paddings ("same") alike.
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            inputs = F.pad(inputs, module._reversed_padding_repeated_twice, mode=mode)
        patches = F.unfold(
            inputs, module.kernel_size, dilation=module.dilation, stride=module.stride
        )  # (N, C_in*kh*kw, L)
        if reduce:
            rows = patches.mean(2)
        else:
            rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    elif reduce and inputs.dim() > 2:
        rows = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1]).mean(1)
    else:
        rows = inputs.reshape(-1, inputs.shape[-1])
    if module.bias is not None:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    return rows


def check_capturable(
    model: nn.Module, supported: Callable[[nn.Module], bool] = is_supported
) -> None:
    """Refuse, with the alternative, a model whose layers the hooks cannot see or split.

    * ``nn.MultiheadAttention`` (also inside ``nn.TransformerEncoderLayer`` and friends) passes
      ``in_proj_weight`` and ``out_proj.weight`` to ``F.multi_head_attention_forward`` without
      calling a submodule, so no forward hook ever sees its projections' inputs (and its
      ``out_proj``, an ``nn.Linear`` subclass, would look supported yet never record). Write
      the attention with ``nn.Linear`` projections and ``F.scaled_dot_product_attention``, as
      nanoGPT does (README, "Transformers"); those projections are then ordinary blocks.
    * Tied weights. A Parameter shared by an ``nn.Embedding`` (or any unsupported module) and a
      supported layer is preconditioned by that layer's block, with the sum of the gradients
      of all its uses (the usual tied embedding/head: the head's block; the embedding is then
      no block of its own, see :func:`block_layers`). One Parameter held by two other
      supported layers would be updated by both blocks: refused.

    Raises:
        ValueError: naming the module and what to do instead.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            raise ValueError(
                f"module {name!r} is an nn.MultiheadAttention: it applies its input and output "
                "projections through F.multi_head_attention_forward on bare Parameters, which "
                "no hook can capture, so foof cannot precondition them. Write the attention "
                "with nn.Linear projections (qkv = nn.Linear(d, 3 * d), proj = nn.Linear(d, d)) "
                "and F.scaled_dot_product_attention, as nanoGPT does; see the README section "
                "'Transformers'"
            )
    owners: dict[int, str] = {}
    for name, module in block_layers(model, supported).items():
        for param in module.parameters(recurse=False):
            if id(param) in owners:
                raise ValueError(
                    f"layers {owners[id(param)]!r} and {name!r} share one Parameter; each "
                    "curvature block would update it. foof preconditions a tied weight by the "
                    "block of the one supported layer that holds it (e.g. a head tied to an "
                    "nn.Embedding); tie at most one supported layer to it"
                )
            owners[id(param)] = name


def layer_in_dim(module: nn.Module) -> int:
    """Columns of the layer's rows ``ā``: ``in_features`` or ``C_in·kh·kw``, plus 1 for a bias.

    ``num_embeddings`` for an embedding (one-hot rows).
    """
    if isinstance(module, nn.Embedding):
        return module.num_embeddings
    return module.weight[0].numel() + (module.bias is not None)


def output_rows(module: nn.Module, output_grads: Tensor, kfac_approx: str = "expand") -> Tensor:
    """Reshape gradients w.r.t. a layer's output into rows ``(rows, out_dim)`` matching ``A``.

    With ``kfac_approx="reduce"`` the rows of a sample are summed over its positions,
    ``ê_n = Σ_p e_{n,p}``, one row per sample (KFAC-reduce's gradient side, Eschenhagen et al.,
    2023, eq. 11; the inputs are averaged, see :func:`input_rows`).
    """
    if isinstance(module, nn.Conv2d):
        if kfac_approx == "reduce":
            return output_grads.flatten(2).sum(2)
        return output_grads.flatten(2).transpose(1, 2).reshape(-1, output_grads.shape[1])
    # an embedding's input factor is the diagonal of token frequencies, always expand
    if kfac_approx == "reduce" and output_grads.dim() > 2 and not isinstance(module, nn.Embedding):
        return output_grads.reshape(output_grads.shape[0], -1, output_grads.shape[-1]).sum(1)
    return output_grads.reshape(-1, output_grads.shape[-1])


@dataclass
class LayerRecord:
    """What :class:`Capture` holds for one layer since the last clear.

    Attributes:
        inputs: raw layer inputs, one tensor per forward call (detached, not copied).
        outputs: raw layer outputs, one per forward call, still attached to the graph, so that a
            method can backpropagate extra losses (sampled labels) to them.
        output_grads: gradients of the backpropagated loss w.r.t. the outputs, one per forward
            call (in backward order).
        input_calls, output_grad_calls: the forward call (counted from 0 since the last clear)
            each entry of ``inputs`` / ``output_grads`` belongs to, so that rows of ``A`` and
            ``E`` pair up whatever order the backward passes ran in (gradient accumulation runs
            one backward per forward, a module used twice is backpropagated last call first).
        calls: forward calls recorded since the last clear.
        empty_calls: how many of them had an empty input (batch size 0); counted whatever is
            recorded, so that an optimizer can tell an empty batch from a real one.
    """

    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)
    output_grads: list[Tensor] = field(default_factory=list)
    input_calls: list[int] = field(default_factory=list)
    output_grad_calls: list[int] = field(default_factory=list)
    calls: int = 0
    empty_calls: int = 0

    def mark(self) -> None:
        """Forget the records at the next recorded forward pass, keep them until then.

        What ``zero_grad`` means for statistics: called before a forward pass it clears (the
        usual loop), called between forward and backward it keeps that forward's records.
        """
        self._stale = any(record.calls for record in self.records.values())

    def clear(self) -> None:
        """Drop every recorded tensor."""
        self.inputs.clear()
        self.outputs.clear()
        self.output_grads.clear()
        self.input_calls.clear()
        self.output_grad_calls.clear()
        self.calls = 0
        self.empty_calls = 0


class Capture:
    """Hooks that record per-layer inputs ``A`` and output gradients ``E`` of a model.

    The capture owns its hook handles; call :meth:`close` (or use it as a context manager) to
    remove them. What is recorded is decided per forward pass by three predicates, so a method
    can switch recording off on steps where it does not need a statistic (e.g. FOOF's
    ``stats_steps``) and pay nothing for it.

    Args:
        model: the network; every supported submodule (see :func:`is_supported`) is hooked.
        record_inputs: called at each forward; if true the layer input is kept.
        record_outputs: same, for the layer output (kept attached to the graph).
        record_output_grads: same, for the gradient w.r.t. the output during backward.
        training_only: record only modules in training mode (optimizers); False records in
            eval mode too (curvature of a trained model, e.g. a Laplace posterior).
        supported: which modules are hooked (:func:`is_supported`; FOOF and KFAC pass
            :func:`is_block`, which adds embeddings), after the tied-weight rule of
            :func:`block_layers`.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> with Capture(model) as capture:
        ...     model(torch.randn(5, 3)).sum().backward()
        ...     [tuple(capture.inputs(m).shape) for m in capture.layers.values()]
        [(5, 4), (5, 5)]
    """

    def __init__(
        self,
        model: nn.Module,
        record_inputs: Callable[[], bool] = lambda: True,
        record_outputs: Callable[[], bool] = lambda: False,
        record_output_grads: Callable[[], bool] = lambda: True,
        training_only: bool = True,
        supported: Callable[[nn.Module], bool] = is_supported,
    ) -> None:
        check_capturable(model, supported)
        self.layers: dict[str, nn.Module] = block_layers(model, supported)
        self.records: dict[nn.Module, LayerRecord] = {
            m: LayerRecord() for m in self.layers.values()
        }
        self._record_inputs = record_inputs
        self._record_outputs = record_outputs
        self._record_output_grads = record_output_grads
        self._grads_paused = False
        self._stale = False
        self._training_only = training_only
        # The hooks close over a weak reference so a forgotten capture can still be collected.
        self_ref = weakref.ref(self)

        # Opaque to torch.compile: traced, the hook would record tensors of the compiled graph
        # (no autograd path from the network output to them, so the Fisher pass would see zero
        # gradients) and guard on the optimizer's step counter (a recompilation per step). As a
        # disabled function it is one graph break per hooked layer, and it runs eagerly on the
        # layer's real input and output.
        @torch.compiler.disable
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            capture = self_ref()
            if capture is not None:
                capture._forward_hook(module, args, output)

        handles = [m.register_forward_hook(hook) for m in self.layers.values()]
        # Removes the hooks when the capture is closed or garbage-collected (even inside a
        # reference cycle with its optimizer), without keeping the capture alive itself.
        self._finalizer = weakref.finalize(self, _remove_handles, handles)

    def _forward_hook(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if self._training_only and not module.training:
            return
        if not (torch.is_grad_enabled() and output.requires_grad):
            return
        if self._stale:  # the first recorded forward pass after a mark(): start afresh
            self.clear()
        record = self.records[module]
        call = record.calls
        record.calls += 1
        if args[0].numel() == 0:
            record.empty_calls += 1
        if self._record_inputs():
            record.inputs.append(args[0].detach())
            record.input_calls.append(call)
        if self._record_outputs():
            record.outputs.append(output)
        if self._record_output_grads():
            # Weak references only: the hook lives in the output tensor's autograd metadata,
            # which Python's garbage collector cannot see into. A strong reference would make
            # the cycle capture -> record -> output -> hook -> capture uncollectable whenever the
            # capture also keeps the output (KFAC's sampled-label backward does), so a dropped
            # optimizer would keep its hooks on the model forever.
            capture_ref, record_ref = weakref.ref(self), weakref.ref(record)

            def grad_hook(grad: Tensor) -> None:
                capture, kept = capture_ref(), record_ref()
                if capture is not None and kept is not None and not capture._grads_paused:
                    kept.output_grads.append(grad.detach())
                    kept.output_grad_calls.append(call)

            output.register_hook(grad_hook)

    @contextmanager
    def paused_grads(self) -> Iterator[None]:
        """Backward passes inside this block record no output gradients.

        Tensor hooks fire for every backward through an output, ``torch.autograd.grad`` included;
        a method's extra passes (sampled labels for a Fisher) run in here so that ``E`` keeps
        meaning "gradient of the training loss".
        """
        previous, self._grads_paused = self._grads_paused, True
        try:
            yield
        finally:
            self._grads_paused = previous

    def take_outputs(self) -> dict[nn.Module, list[Tensor]]:
        """The layer outputs recorded since the last take (or clear), per layer, and forget them.

        A Fisher pass backpropagates to the outputs of its own forward pass only: with gradient
        accumulation each micro-batch's pass takes the outputs its forward recorded.
        """
        taken = {}
        for module, record in self.records.items():
            if record.outputs:
                taken[module] = list(record.outputs)
                record.outputs.clear()
        return taken

    def inputs(self, module: nn.Module, kfac_approx: str = "expand") -> Tensor | None:
        """All recorded input rows ``A`` of ``module``: ``(rows, in_dim)``, or None if none.

        ``kfac_approx`` as in :func:`input_rows` (``"reduce"``: one mean row per sample).
        """
        parts = self.records[module].inputs
        if not parts:
            return None
        rows = [input_rows(module, x, kfac_approx) for x in parts]
        return rows[0] if len(rows) == 1 else torch.cat(rows)

    def output_grads(self, module: nn.Module, kfac_approx: str = "expand") -> Tensor | None:
        """All recorded output-gradient rows ``E`` of ``module``: ``(rows, out_dim)``, or None.

        In forward-call order, so that they line up with :meth:`inputs` when every recorded
        call was backpropagated once. ``kfac_approx`` as in :func:`output_rows`.
        """
        record = self.records[module]
        if not record.output_grads:
            return None
        order = sorted(range(len(record.output_grads)), key=record.output_grad_calls.__getitem__)
        rows = [output_rows(module, record.output_grads[i], kfac_approx) for i in order]
        return rows[0] if len(rows) == 1 else torch.cat(rows)

    def calls_pair_up(self, module: nn.Module) -> bool:
        """Whether every recorded call has its input and exactly one output gradient.

        Then :meth:`output_grads` and :meth:`inputs` line up row for row.
        """
        record = self.records[module]
        return sorted(record.output_grad_calls) == record.input_calls

    def paired_rows(self, module: nn.Module) -> tuple[Tensor, Tensor] | None:
        """``(E, A)`` of the forward calls that have both an input and an output gradient.

        ``E`` ``(rows, out_dim)`` and ``A`` ``(rows, in_dim)``, row ``r`` of both from the same
        call and position, so that ``EᵀA`` is the layer's gradient ``[∇W, ∇b]`` of the
        backpropagated losses; calls whose output received no gradient are left out (they add
        nothing to it). None if no call has both.
        """
        record = self.records[module]
        grads: dict[int, Tensor] = {}
        for call, grad in zip(record.output_grad_calls, record.output_grads):
            # an output backpropagated twice (retain_graph) contributes the sum of both
            grads[call] = grad if call not in grads else grads[call] + grad
        pairs = [
            (output_rows(module, grads[call]), input_rows(module, x))
            for call, x in zip(record.input_calls, record.inputs)
            if call in grads
        ]
        if not pairs:
            return None
        if len(pairs) == 1:
            return pairs[0]
        return torch.cat([e for e, _ in pairs]), torch.cat([a for _, a in pairs])

    def num_forward_calls(self, module: nn.Module) -> int:
        """How many recorded forward calls ``module`` had since the last clear."""
        record = self.records[module]
        return max(len(record.inputs), len(record.outputs))

    def items(self) -> Iterator[tuple[str, nn.Module]]:
        """``(name, module)`` for every hooked layer, in ``model.named_modules()`` order."""
        return iter(self.layers.items())

    def mark(self) -> None:
        """Forget the records at the next recorded forward pass, keep them until then.

        What ``zero_grad`` means for statistics: called before a forward pass it clears (the
        usual loop), called between forward and backward it keeps that forward's records.
        """
        self._stale = any(record.calls for record in self.records.values())

    def clear(self) -> None:
        """Forget everything recorded (the hooks stay)."""
        self._stale = False
        for record in self.records.values():
            record.clear()

    def close(self) -> None:
        """Remove every hook and drop every record. Safe to call twice."""
        self._finalizer()
        self.clear()

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _remove_handles(handles: list) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


def unsupported_parameters(
    model: nn.Module, supported: Callable[[nn.Module], bool] = is_supported
) -> dict[str, nn.Parameter]:
    """Trainable parameters that no supported layer owns, by qualified name."""
    owned = {
        id(p) for m in block_layers(model, supported).values() for p in m.parameters(recurse=False)
    }
    return {
        name: p for name, p in model.named_parameters() if p.requires_grad and id(p) not in owned
    }
