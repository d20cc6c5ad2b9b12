"""What skipping layers costs: perplexity and top-1 agreement on held-out text, for every single
layer and for greedy multi-layer plans.

Cheap by construction: skipping layer k leaves positions 0..k-1 as they were, so one pass under
the current plan records every position's output and each candidate replays the first k of them
instead of recomputing (``layer_ops(..., replay=...)``). Trying every layer then costs about half
of one full pass per layer; ``reuse=False`` is the naive way (a full pass per candidate), kept
for the benchmark and the tests, which check both give the same numbers.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from .errors import SteerError
from .families import Adapter
from .hooks import hooks
from .layers import LayerOp, executed_layers, layer_ops


@dataclass
class PlanScore:
    """One plan (the layers it skips) scored against the unmodified model."""

    skipped: tuple[int, ...]
    perplexity: float
    rise: float  # perplexity / unmodified perplexity - 1
    agreement: float  # share of positions whose top-1 token matches the unmodified model's
    compute: float  # share of layer executions kept
    tokens_per_s: float | None = None

    @property
    def ops(self) -> tuple[LayerOp, ...]:
        return (LayerOp.skip(*self.skipped),) if self.skipped else ()

    @property
    def name(self) -> str:
        return "skip " + ",".join(map(str, self.skipped)) if self.skipped else "none"


@dataclass
class _Tally:
    nll: float = 0.0
    tokens: int = 0
    agree: int = 0
    positions: int = 0

    def add(self, logits: torch.Tensor, ids: torch.Tensor, reference: torch.Tensor) -> None:
        # Targets shifted in place of slicing the logits: a (batch, T - 1, vocab) slice would be copied.
        targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)
        nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
        self.nll += float(nll)
        self.tokens += ids[:, 1:].numel()
        self.agree += int((logits.max(-1).indices == reference).sum())
        self.positions += reference.numel()

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)


@dataclass
class Scan:
    """Scores of every candidate tried on top of ``base`` (the plan each greedy step extends)."""

    base: PlanScore
    candidates: dict[int, PlanScore] = field(default_factory=dict)
    reference: list[torch.Tensor] = field(default_factory=list)  # unmodified top-1 tokens, per batch

    def best(self) -> PlanScore:
        return min(self.candidates.values(), key=lambda s: s.perplexity)


def text_blocks(tokenizer, text: str, block: int = 256, max_tokens: int | None = 2048) -> torch.Tensor:
    """``text`` tokenized once and cut into ``(n, block)`` rows (the ragged end is dropped)."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = ids.numel() // block
    if n == 0:
        raise SteerError(f"the text is too short: {ids.numel()} tokens, need at least one block of {block}")
    return ids[: n * block].view(n, block)


@contextmanager
def recording(layers: Sequence[torch.nn.Module], store: list) -> Iterator[None]:
    """Every position's output, as the layer returned it (what the next position reads), into
    ``store[i]`` while the block runs (the layer scan's replay and ``similarity.hidden_states``)."""
    def hook(i: int):
        def record(module, args, output):
            store[i] = output
        return record

    with hooks(*[(layer, "post", hook(i)) for i, layer in enumerate(layers)]):
        yield


def _forward(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, use_cache=False).logits


@torch.no_grad()
def scan_skips(model, blocks: torch.Tensor, base: Sequence[int] = (), batch_size: int = 4, reuse: bool = True,
               reference: list[torch.Tensor] | None = None, baseline: float | None = None) -> Scan:
    """Score ``base + (k,)`` for every layer ``k`` not in ``base`` on ``blocks`` of token ids.

    ``reference``: the unmodified model's top-1 token per batch (computed when ``base`` is empty),
    ``baseline``: its perplexity; greedy steps reuse both from the single-layer scan.
    """
    adapter = Adapter(model)
    n = adapter.n_layers
    base = tuple(sorted(base))
    batches = list(torch.split(blocks, batch_size))
    if base and (reference is None or len(reference) != len(batches) or baseline is None):
        raise ValueError("scoring on top of a plan needs the unmodified model's top-1 tokens for every batch "
                         "and its perplexity (the single-layer scan's reference and base perplexity)")
    candidates = [k for k in range(n) if k not in base]
    device = next(model.parameters()).device
    base_tally, tallies = _Tally(), {k: _Tally() for k in candidates}
    reference = [] if reference is None else list(reference)
    outputs: list = [None] * n
    for b, ids in enumerate(batches):
        ids = ids.to(device)
        with recording(adapter.layers, outputs), layer_ops(model, [LayerOp.skip(*base)] if base else []):
            logits = _forward(model, ids)
        if b == len(reference):
            reference.append(logits.max(-1).indices)
        base_tally.add(logits, ids, reference[b])
        del logits
        for k in candidates:
            plan = [LayerOp.skip(*sorted(base + (k,)))]
            with layer_ops(model, plan, replay=outputs[:k] if reuse else None):
                tallies[k].add(_forward(model, ids), ids, reference[b])
        outputs = [None] * n
    baseline = base_tally.perplexity if baseline is None else baseline

    def score(skipped: tuple[int, ...], tally: _Tally) -> PlanScore:
        ops = [LayerOp.skip(*skipped)] if skipped else []
        return PlanScore(skipped, tally.perplexity, tally.perplexity / baseline - 1,
                         tally.agree / tally.positions, len(executed_layers(ops, n)) / n)

    return Scan(score(base, base_tally), {k: score(tuple(sorted(base + (k,))), t) for k, t in tallies.items()},
                reference)


def greedy_plans(model, blocks: torch.Tensor, max_skips: int = 4, first: Scan | None = None,
                 batch_size: int = 4) -> list[PlanScore]:
    """Greedy search: each step adds the layer whose skip hurts perplexity least.

    Returns the plan after each step (1..max_skips layers, fewer if only one layer would be left).
    ``first``: the single-layer scan of the same ``blocks`` and ``batch_size``, when already done
    (step one).
    """
    if first is None:
        first = scan_skips(model, blocks, batch_size=batch_size)
    baseline = first.base.perplexity
    plans = [first.best()]
    while len(plans) < max_skips:
        if len(plans[-1].skipped) >= Adapter(model).n_layers - 1:
            break
        step = scan_skips(model, blocks, base=plans[-1].skipped, batch_size=batch_size, reference=first.reference,
                          baseline=baseline)
        plans.append(step.best())
    return plans


def within_budget(plans: Sequence[PlanScore], max_rise: float) -> PlanScore | None:
    """The plan skipping the most layers with a perplexity rise of at most ``max_rise`` (None if none)."""
    fitting = [p for p in plans if p.skipped and p.rise <= max_rise]
    return max(fitting, key=lambda p: (len(p.skipped), -p.perplexity)) if fitting else None


@torch.no_grad()
def tokens_per_second(model, prompt: torch.Tensor, ops: Sequence[LayerOp] = (), new_tokens: int = 16) -> float:
    """Greedy decoding speed at batch 1 with ``ops`` applied (one run)."""
    prompt = prompt.view(1, -1).to(next(model.parameters()).device)
    pad = model.generation_config.pad_token_id
    pad = model.generation_config.eos_token_id if pad is None else pad
    pad = pad[0] if isinstance(pad, (list, tuple)) else pad
    with layer_ops(model, ops):
        start = time.perf_counter()
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
        seconds = time.perf_counter() - start
    return new_tokens / seconds


def round_robin_speeds(model, prompt: torch.Tensor, plans: Sequence[Sequence[LayerOp]], new_tokens: int = 16,
                       rounds: int = 3) -> list[float]:
    """Median tokens/s of each plan, measured in turns (plan 1, 2, ..., 1, 2, ...) so that load
    bursts on a shared machine spread over all plans instead of landing on one."""
    tokens_per_second(model, prompt, new_tokens=2)  # warm-up
    runs: list[list[float]] = [[] for _ in plans]
    for _ in range(rounds):
        for i, ops in enumerate(plans):
            runs[i].append(tokens_per_second(model, prompt, ops, new_tokens))
    return [sorted(r)[len(r) // 2] for r in runs]
