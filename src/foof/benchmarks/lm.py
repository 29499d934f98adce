"""``foof bench --suite lm``: a byte-level GPT on Python's documentation, optimizer by optimizer.

Every optimizer trains the same nanoGPT-style decoder (:class:`GPT`, attention written with
``nn.Linear`` so that FOOF and KFAC see its projections) on the same batches, with the same
learning-rate grid size (:attr:`LMConfig.lr_grid`, three values per method), the same schedule
(linear warm-up, then cosine to 10 % of the peak, :func:`lr_multiplier`) and the same step
budget. All (method, lr, seed) runs advance *interleaved* in one process, one step each in turn,
so a slow phase of the shared machine costs every method alike; only training steps are timed
(evaluations are not).

Reported (``lm-<device>.md`` / ``.json`` and a PNG): validation loss against steps and against
training seconds, and for each method at its best learning rate the time to reach AdamW's final
validation loss as a ratio to AdamW's time (AdamW's final loss and time per seed, the ratio the
mean over seeds; a method that never reaches it within the budget has no ratio).

Methods: AdamW; ``torch.optim.Muon`` on the hidden weight matrices with AdamW on the rest (the
embedding, the head, norms and biases, as Muon's authors do); heavyball's SOAP and PSGD-Kron when
the ``bench`` extra is installed (run eagerly, ``heavyball.utils.compile_mode = None``: inductor
would compile for minutes on a small CPU); FOOF and KFAC on every ``nn.Linear`` (attention
projections, MLP, head) with AdamW for everything else, the token embedding included
(:func:`curvature_optimizers`).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from foof.data.text import VOCAB_SIZE, load_text_corpus, random_windows

FALLBACK_LR = 3e-3
"""Peak lr of the AdamW that trains the non-block parameters of Muon, FOOF and KFAC."""


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a 4x MLP, all ``nn.Linear``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.fc = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, h: Tensor) -> Tensor:
        """``(B, T, d)`` → ``(B, T, d)``."""
        batch, length, width = h.shape
        q, k, v = self.qkv(self.norm1(h)).split(width, dim=-1)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        return h + self.fc2(F.gelu(self.fc(self.norm2(h))))


class GPT(nn.Module):
    """A nanoGPT-style decoder: token embedding, learned positions, blocks, untied head.

    Args:
        vocab: vocabulary size ``V`` (256 for bytes).
        width: model width ``d``.
        layers: number of blocks.
        heads: attention heads (``d`` divisible by it).
        context: longest sequence ``T``.

    ``(B, T)`` token ids → ``(B, T, V)`` logits.
    """

    def __init__(
        self,
        vocab: int = VOCAB_SIZE,
        width: int = 128,
        layers: int = 4,
        heads: int = 4,
        context: int = 128,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.position, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        """``(B, T)`` int64 → ``(B, T, V)``."""
        h = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def token_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy per token (nats), the convention of KFAC's ``(B, T, V)`` Fisher."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def lr_multiplier(step: int, steps: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from 1 to ``floor`` at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class LMConfig:
    """What the LM benchmark runs. Defaults: the full mode (see :func:`quick_lm_config`).

    Attributes:
        width, layers, heads, context: the model (:class:`GPT`).
        batch_size: sequences per step.
        steps: training steps per run (the budget; the schedule ends there).
        warmup: warm-up steps of the schedule.
        eval_every: steps between validation evaluations (and at the end).
        eval_batches: validation batches (fixed windows) per evaluation.
        seeds: model-initialisation and data seeds.
        methods: method keys, see :data:`METHODS`.
        lr_grid: the lr grid per method (three values each by default).
        max_bytes: bytes of each split kept (None: all of it).
        data_dir: directory searched first for the corpus.
        threads: torch threads.
    """

    width: int = 128
    layers: int = 4
    heads: int = 4
    context: int = 128
    batch_size: int = 8
    steps: int = 300
    warmup: int = 30
    eval_every: int = 25
    eval_batches: int = 8
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = ("adamw", "muon", "soap", "psgd-kron", "foof", "kfac")
    lr_grid: dict[str, tuple[float, ...]] = field(
        default_factory=lambda: {
            "adamw": (1e-3, 3e-3, 1e-2),
            "muon": (0.01, 0.02, 0.05),
            "soap": (1e-3, 3e-3, 1e-2),
            "psgd-kron": (3e-4, 1e-3, 3e-3),
            "foof": (0.03, 0.1, 0.3),
            "kfac": (0.03, 0.1, 0.3),
        }
    )
    max_bytes: int | None = None
    data_dir: str | None = None
    threads: int | None = 1


def quick_lm_config(**overrides: Any) -> LMConfig:
    """The CI mode: a 2-layer width-32 model on a 200 kB slice, 12 steps, one lr, one seed."""
    config = LMConfig(
        width=32,
        layers=2,
        heads=2,
        context=32,
        batch_size=4,
        steps=12,
        warmup=2,
        eval_every=6,
        eval_batches=2,
        seeds=(0,),
        max_bytes=200_000,
        methods=("adamw", "muon", "foof", "kfac"),
        lr_grid={"adamw": (3e-3,), "muon": (0.02,), "foof": (0.1,), "kfac": (0.1,)},
    )
    return replace(config, **overrides)


# -- methods ---------------------------------------------------------------------------------


class Trainer:
    """One method on one model: its optimizers, their peak lrs, and how to backpropagate.

    Attributes:
        optimizers: every optimizer the method steps (e.g. FOOF and the fallback AdamW).
        peak_lrs: per optimizer, per parameter group, the peak lr the schedule scales.
        backward: ``backward(loss, logits)``; KFAC's runs its Fisher pass first.
    """

    def __init__(
        self,
        optimizers: list[torch.optim.Optimizer],
        backward: Callable[[Tensor, Tensor], None] | None = None,
    ) -> None:
        self.optimizers = optimizers
        self.peak_lrs = [[g["lr"] for g in opt.param_groups] for opt in optimizers]
        self.backward = backward or (lambda loss, logits: loss.backward())

    def step(self, model: nn.Module, x: Tensor, y: Tensor, multiplier: float) -> float:
        """One training step at ``multiplier`` times the peak lrs; the loss."""
        for opt, peaks in zip(self.optimizers, self.peak_lrs):
            for group, peak in zip(opt.param_groups, peaks):
                group["lr"] = peak * multiplier
            opt.zero_grad(set_to_none=True)
        logits = model(x)
        loss = token_loss(logits, y)
        self.backward(loss, logits)
        for opt in self.optimizers:
            opt.step()
        return float(loss.detach())

    def close(self) -> None:
        """Remove the hooks of foof's optimizers."""
        for opt in self.optimizers:
            if hasattr(opt, "close"):
                opt.close()


def _adamw(params: list[nn.Parameter], lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)


def curvature_optimizers(
    kind: str, model: nn.Module, lr: float, options: dict[str, Any], fallback_lr: float
) -> list[torch.optim.Optimizer]:
    """FOOF or KFAC on the model's blocks, AdamW (``fallback_lr``) on every other parameter.

    The one place the benchmark builds foof's optimizers. Until ``FOOF``/``KFAC`` take
    ``fallback=`` themselves, the blocks (the layers of :func:`foof.capture.is_supported`:
    Linear and Conv2d) are gathered into a container the optimizer is built on, so it owns
    exactly their parameters, and a separate AdamW takes the rest. With the fallback API this
    becomes ``[cls(model, lr=lr, fallback=torch.optim.AdamW, fallback_options=...)]``, which
    also preconditions the embedding (:func:`foof.capture.is_block`, a diagonal ``Σ``); the
    committed results (docs/benchmarks/lm-cpu.md) leave it to AdamW.
    """
    from foof import FOOF, KFAC
    from foof.capture import is_supported

    blocks = nn.ModuleList(m for m in model.modules() if is_supported(m))
    owned = {id(p) for p in blocks.parameters()}
    rest = [p for p in model.parameters() if id(p) not in owned]
    cls = FOOF if kind == "foof" else KFAC
    optimizers: list[torch.optim.Optimizer] = [cls(blocks, lr=lr, **options)]
    if rest:
        optimizers.append(_adamw(rest, fallback_lr))
    return optimizers


FOOF_OPTIONS: dict[str, Any] = dict(damping=0.1, momentum=0.9)
"""FOOF's settings besides the lr: Σ every step (``inv_every=1``, Cholesky solves), EMA 0.95."""

KFAC_OPTIONS: dict[str, Any] = dict(damping=0.1, momentum=0.9, inv_every=5, stats_steps=1, seed=0)
"""KFAC's: MC Fisher and inverses every 5 steps (the Fisher pass is a second backward)."""


def build_trainer(method: str, model: nn.Module, lr: float) -> Trainer:
    """The :class:`Trainer` of ``method`` (a key of :data:`METHODS`) at peak lr ``lr``.

    Raises:
        ImportError: heavyball is not installed (SOAP, PSGD-Kron).
    """
    if method == "adamw":
        return Trainer([_adamw(list(model.parameters()), lr)])
    if method == "muon":
        blocks = [p for n, p in model.named_parameters() if p.ndim == 2 and n.startswith("blocks")]
        owned = {id(p) for p in blocks}
        rest = [p for p in model.parameters() if id(p) not in owned]
        muon = torch.optim.Muon(blocks, lr=lr, weight_decay=0.0, momentum=0.95)
        return Trainer([muon, _adamw(rest, FALLBACK_LR)])
    if method in ("soap", "psgd-kron"):
        import heavyball

        heavyball.utils.compile_mode = None
        cls = heavyball.SOAP if method == "soap" else heavyball.PSGDKron
        return Trainer([cls(list(model.parameters()), lr=lr, weight_decay=0.0)])
    if method == "foof":
        return Trainer(curvature_optimizers("foof", model, lr, FOOF_OPTIONS, FALLBACK_LR))
    if method == "kfac":
        optimizers = curvature_optimizers("kfac", model, lr, KFAC_OPTIONS, FALLBACK_LR)
        kfac = optimizers[0]
        return Trainer(optimizers, backward=kfac.backward)
    raise ValueError(f"unknown LM method {method!r}; choose from {', '.join(METHODS)}")


METHODS = {
    "adamw": "AdamW (betas 0.9, 0.95)",
    "muon": "torch.optim.Muon (hidden matrices) + AdamW",
    "soap": "heavyball SOAP",
    "psgd-kron": "heavyball PSGD-Kron",
    "foof": "FOOF (Linear blocks) + AdamW",
    "kfac": "KFAC (Linear blocks, MC Fisher) + AdamW",
}


def available(method: str) -> str | None:
    """None if ``method`` can run here, else why not."""
    if method in ("soap", "psgd-kron"):
        try:
            import heavyball  # noqa: F401
        except ImportError as error:
            return f"heavyball not installed (pip install 'foof[bench]'): {error}"
    return None


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Run:
    """One (method, lr, seed) training run in the interleaved loop."""

    method: str
    lr: float
    seed: int
    model: nn.Module
    trainer: Trainer
    generator: torch.Generator
    seconds: float = 0.0
    curve: list[dict[str, float]] = field(default_factory=list)
    diverged: bool = False


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> float:
    """Mean per-token validation loss over fixed batches, in eval mode."""
    model.eval()
    losses = [float(token_loss(model(x), y)) for x, y in batches]
    model.train()
    return sum(losses) / len(losses)


def parameter_count(config: LMConfig) -> int:
    """Trainable parameters of the benchmark's model."""
    model = GPT(VOCAB_SIZE, config.width, config.layers, config.heads, config.context)
    return sum(p.numel() for p in model.parameters())


def run_lm(
    config: LMConfig, out: str | Path | None = None, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Train every (method, lr, seed) interleaved; write ``lm-cpu.md``/``.json``/``.png``.

    Args:
        config: what to run.
        out: directory for the report (None: write nothing).
        log: progress messages.

    Returns:
        The results (what the JSON holds).
    """
    say = log or (lambda message: None)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    split = load_text_corpus(config.data_dir, max_bytes=config.max_bytes)
    val_generator = torch.Generator().manual_seed(10_000)
    val_batches = [
        random_windows(split.val, config.batch_size, config.context, val_generator)
        for _ in range(config.eval_batches)
    ]
    skipped = {m: why for m in config.methods if (why := available(m)) is not None}
    methods = [m for m in config.methods if m not in skipped]
    for method, why in skipped.items():
        say(f"{method}: skipped, {why}")
    runs: list[Run] = []
    for seed in config.seeds:
        for method in methods:
            for lr in config.lr_grid[method]:
                torch.manual_seed(seed)
                model = GPT(VOCAB_SIZE, config.width, config.layers, config.heads, config.context)
                runs.append(
                    Run(
                        method,
                        lr,
                        seed,
                        model,
                        build_trainer(method, model, lr),
                        torch.Generator().manual_seed(seed),
                    )
                )
    say(f"{len(runs)} runs of {config.steps} steps, interleaved")
    started = time.perf_counter()
    for run in runs:
        run.curve.append({"step": 0, "seconds": 0.0, "val_loss": evaluate(run.model, val_batches)})
    for step in range(config.steps):
        multiplier = lr_multiplier(step, config.steps, config.warmup)
        for run in runs:
            if run.diverged:
                continue
            # every run of a seed sees the same batches: one generator per run, same seed
            x, y = random_windows(split.train, config.batch_size, config.context, run.generator)
            begin = time.perf_counter()
            loss = run.trainer.step(run.model, x, y, multiplier)
            run.seconds += time.perf_counter() - begin
            if not math.isfinite(loss) or loss > 20.0:
                run.diverged = True
                run.curve.append({"step": step + 1, "seconds": run.seconds, "val_loss": math.inf})
                continue
            if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
                val = evaluate(run.model, val_batches)
                run.curve.append({"step": step + 1, "seconds": run.seconds, "val_loss": val})
        if (step + 1) % config.eval_every == 0:
            say(f"step {step + 1}/{config.steps} ({time.perf_counter() - started:.0f} s)")
    for run in runs:
        run.trainer.close()
    results = summarize(config, runs, split, skipped)
    results["total_seconds"] = time.perf_counter() - started
    results = _jsonable(results)
    if out is not None:
        write_lm_report(results, Path(out))
    return results


def summarize(
    config: LMConfig, runs: list[Run], split: Any, skipped: dict[str, str]
) -> dict[str, Any]:
    """Best lr per method (lowest mean final validation loss) and the times to AdamW's loss."""
    from foof.benchmarks.runner import machine_notes

    def final(run: Run) -> float:
        return run.curve[-1]["val_loss"]

    by_method: dict[str, dict[str, Any]] = {}
    for method in dict.fromkeys(r.method for r in runs):
        grid = {}
        for lr in config.lr_grid[method]:
            finals = [final(r) for r in runs if r.method == method and r.lr == lr]
            grid[lr] = sum(finals) / len(finals)
        best = min(grid, key=grid.__getitem__)
        by_method[method] = {
            "label": METHODS[method],
            "lr_grid": {str(k): v for k, v in grid.items()},
            "best_lr": best,
            "final_val_loss": grid[best],
            "seconds_per_step": sum(
                r.seconds / config.steps for r in runs if r.method == method and r.lr == best
            )
            / len(config.seeds),
        }
    best_runs = {(r.method, r.seed): r for r in runs if r.lr == by_method[r.method]["best_lr"]}
    for method, entry in by_method.items():
        ratios, times = [], []
        for seed in config.seeds:
            reference = best_runs.get(("adamw", seed))
            run = best_runs[(method, seed)]
            if reference is None:
                continue
            target = final(reference)
            reached = next((p for p in run.curve if p["val_loss"] <= target), None)
            times.append(None if reached is None else reached["seconds"])
            ratios.append(None if reached is None else reached["seconds"] / reference.seconds)
        known = [r for r in ratios if r is not None]
        entry["time_to_adamw"] = times
        entry["ratio_to_adamw"] = ratios
        entry["mean_ratio"] = (
            sum(known) / len(known) if len(known) == len(ratios) and known else None
        )
    return {
        "config": _jsonable(asdict(config)),
        "parameters": parameter_count(config),
        "corpus": {
            "path": split.path,
            "train_bytes": len(split.train),
            "val_bytes": len(split.val),
            "train_files": split.train_files,
            "val_files": split.val_files,
        },
        "skipped": skipped,
        "methods": by_method,
        "runs": [
            {
                "method": r.method,
                "lr": r.lr,
                "seed": r.seed,
                "seconds": r.seconds,
                "diverged": r.diverged,
                "curve": r.curve,
            }
            for r in runs
        ],
        "machine": _jsonable(machine_notes(torch.device("cpu"))),
        "command": " ".join(sys.argv),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def write_lm_report(results: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """``lm-cpu.json``, ``lm-cpu.md`` and (with matplotlib) ``lm-cpu.png`` in ``out``."""
    from foof.io import write_json_atomic

    out.mkdir(parents=True, exist_ok=True)
    json_path = write_json_atomic(out / "lm-cpu.json", results)
    plotted = plot_lm(results, out / "lm-cpu.png")
    md_path = out / "lm-cpu.md"
    md_path.write_text(render_lm(results, plotted), encoding="utf-8")
    return json_path, md_path


def plot_lm(results: dict[str, Any], path: Path) -> bool:
    """Validation loss vs steps and vs seconds at each method's best lr, every seed.

    Returns:
        False (and no file) without matplotlib.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    colours = {}
    for run in results["runs"]:
        entry = results["methods"][run["method"]]
        if run["lr"] != entry["best_lr"]:
            continue
        points = [p for p in run["curve"] if _finite(p["val_loss"])]
        colour = colours.setdefault(run["method"], f"C{len(colours)}")
        label = (
            f"{run['method']} lr={run['lr']:g}"
            if run["seed"] == results["config"]["seeds"][0]
            else None
        )
        by_step.plot(
            [p["step"] for p in points], [p["val_loss"] for p in points], color=colour, label=label
        )
        by_time.plot([p["seconds"] for p in points], [p["val_loss"] for p in points], color=colour)
    by_step.set(xlabel="step", ylabel="validation loss (nats/byte)")
    by_time.set(xlabel="training seconds (interleaved run)", ylabel="validation loss")
    by_step.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def render_lm(results: dict[str, Any], plotted: bool = True) -> str:
    """The Markdown report."""
    config = results["config"]
    corpus = results["corpus"]
    lines = [
        "# LM benchmark (CPU): byte-level GPT on the Python 3.11 documentation",
        "",
        f"Command: `{results['command']}`.",
        "",
        f"Model: GPT, {config['layers']} layers, width {config['width']}, {config['heads']} "
        f"heads, context {config['context']}, byte vocabulary 256, untied head: "
        f"{results['parameters']:,} parameters. Batch {config['batch_size']} sequences "
        f"({config['batch_size'] * config['context']:,} tokens), {config['steps']} steps, "
        f"warm-up {config['warmup']} then cosine to 10 %, seeds {config['seeds']}; validation "
        f"every {config['eval_every']} steps on {config['eval_batches']} fixed batches.",
        "",
        f"Corpus: {corpus['train_files']} training files ({corpus['train_bytes']:,} bytes), "
        f"{corpus['val_files']} held-out files ({corpus['val_bytes']:,} bytes), every 10th file "
        "held out.",
        "",
        "| method | lr grid: mean final val loss | best lr | final val loss | s/step | "
        "time to AdamW's final loss / AdamW's time |",
        "|---|---|---|---|---|---|",
    ]
    for entry in results["methods"].values():
        grid = ", ".join(f"{float(lr):g}: {_loss(v)}" for lr, v in entry["lr_grid"].items())
        ratios = entry["ratio_to_adamw"]
        ratio = "not reached" if entry["mean_ratio"] is None else f"{entry['mean_ratio']:.2f}x"
        if len(ratios) > 1:
            ratio += " (" + ", ".join("-" if r is None else f"{r:.2f}" for r in ratios) + ")"
        lines.append(
            f"| {entry['label']} | {grid} | {entry['best_lr']:g} | "
            f"{_loss(entry['final_val_loss'])} | {entry['seconds_per_step']:.3f} | {ratio} |"
        )
    for method, why in results["skipped"].items():
        lines.append(f"| {METHODS.get(method, method)} | skipped: {why} | | | | |")
    lines += [""]
    if plotted:
        lines += ["![validation loss vs steps and seconds](lm-cpu.png)", ""]
    lines += [
        f"Total wall-clock {results['total_seconds']:.0f} s. All runs interleaved in one "
        "process (one step of every run in turn); seconds count training steps only.",
        "",
    ]
    return "\n".join(lines)


def _loss(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) and math.isfinite(value) else "diverged"


def _finite(value: Any) -> bool:
    return isinstance(value, float) and math.isfinite(value)
