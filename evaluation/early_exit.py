"""Measure early exit on held-out text, side by side: simulated curves and real runs.

* **Simulated** (teacher forced, cheap, every threshold): one full-model pass records each
  token's state at the check layers; a rule's exit layer and whether the mapped top-1 there
  equals the full model's give compute saved and agreement. It ignores that skipped layers'
  K/V come from the exited state, so it is checked against:
* **Real, teacher forced**: the same held-out text through :func:`early_exit` with
  ``positions="all"``: every position exits where the rule says, and later positions attend to
  the propagated K/V, exactly as in token-by-token decoding. Gives agreement, layers really
  skipped, and the perplexity of the held-out text under the early-exit logits.
* **Real, generating**: greedy continuations of held-out prompts at batch 1 with and without
  exit (exact match of the whole continuation) and tokens/s, interleaved runs, medians.
"""
from __future__ import annotations

import contextlib
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from steer import Adapter

from steer.generation.corpus import token_chunks
from steer.generation.exit_model import ExitModel
from steer.generation.calibrate import TokenStats
from steer.generation.fit import THRESHOLDS, Records, mapped_stats, record
from steer.generation.runtime import early_exit
from steer.generation.simulate import classifier_exits, confidence_exits, distribution_outcome, oracle_exits, outcome, saved_at


@dataclass
class Heldout:
    """Held-out records read through an exit model: everything the simulation needs.

    ``records`` covers every position of ``chunks``; the simulation reads the ``scored`` ones
    (positions after each chunk's prompt, the ones a generating model decides)."""

    records: Records
    chunks: list[torch.Tensor]
    correct: np.ndarray  # (N_scored, n_check)
    top_prob: np.ndarray  # (N_scored, n_check)
    logits: np.ndarray  # (N_scored, n_check) classifier log-odds
    stats: TokenStats | None = None  # calibrated exit distributions, scored positions
    full_nll: np.ndarray | None = None  # (N_scored,) the full model's NLL of the next token
    prompt_lens: list[int] | None = None


@torch.no_grad()
def prepare(model, tokenizer, text: str | None, exit_model: ExitModel, max_tokens: int = 4096, chunk: int = 128,
            samples: list | None = None) -> Heldout:
    """Record held-out ``text`` (cut into chunks), or ``samples`` (:class:`generation.selfgen.Sample`:
    prompt + continuation, only the continuation scored), and read them through ``exit_model``."""
    exit_model.check_model(model)
    if samples is not None:
        chunks, prompt_lens = [s.ids for s in samples], [s.prompt_len for s in samples]
    else:
        chunks, prompt_lens = token_chunks(tokenizer, text, chunk, max_tokens), None
    if not chunks:
        raise ValueError(f"the held-out text is too short: it has fewer than {chunk} tokens")
    records = record(model, chunks, exit_model.check_layers, prompt_lens=prompt_lens)
    scored = records.select(records.scored)
    stats = mapped_stats(model, scored, exit_model.maps, exit_model.exit_scale)
    logits = np.stack([exit_model.log_odds(torch.from_numpy(scored.features(j, exit_model.feature_set)), j).numpy()
                       for j in range(len(records.layers))], 1)
    return Heldout(records, chunks, stats.correct, stats.top_prob, logits, stats,
                   -scored.logprob_next.numpy().astype(float), prompt_lens)


def simulated_curves(held: Heldout, n_layers: int, thresholds=THRESHOLDS) -> dict:
    """``{rule: [(threshold, saved, agreement), ...]}``, the same as dicts with KL and perplexity
    rise (``points``), the oracle's saving and each rule's saving at >= 95% agreement."""
    layers = held.records.layers
    exits = {"classifier": lambda t: classifier_exits(held.logits, layers, n_layers, t),
             "confidence": lambda t: confidence_exits(held.top_prob, layers, n_layers, t)}
    points = {rule: [dict(threshold=t, **distribution_outcome(fn(t), held.stats, held.full_nll, layers, n_layers))
                     for t in thresholds] for rule, fn in exits.items()}
    curves = {rule: [(p["threshold"], p["saved"], p["agreement"]) for p in pts] for rule, pts in points.items()}
    oracle = outcome(oracle_exits(held.correct, layers, n_layers), held.correct, layers, n_layers)[0]
    return {"curves": curves, "points": points, "oracle_saved": oracle,
            "saved_at_95": {rule: saved_at([(s, a) for _, s, a in points]) for rule, points in curves.items()}}


def threshold_for(points: list[tuple[float, float, float]], agreement: float = 0.95) -> float:
    """The threshold saving the most while keeping ``agreement`` on these points."""
    ok = [(saved, t) for t, saved, agree in points if agree >= agreement]
    return max(ok)[1] if ok else 1.0


@torch.no_grad()
def teacher_forced(model, held: Heldout, exit_model: ExitModel, rule: str, threshold: float,
                   max_chunks: int | None = None, propagate: str = "defer", prompt_positions: int = 0) -> dict:
    """Real early exit over held-out chunks (positions="all"): agreement, saved, perplexity change, KL.

    ``saved`` is what the scored positions' exits skip (``wanted_saved_fraction``): token-by-token
    decoding skips exactly that; one parallel pass computes a layer while any position still needs
    it. Prompt positions of ``held`` (or the first ``prompt_positions``) never exit and are not
    counted. ``propagate`` is :func:`early_exit`'s."""
    device = next(model.parameters()).device
    adapter = Adapter(model)
    chunks = held.chunks[:max_chunks] if max_chunks else held.chunks
    agree, nll, full_nll, kl = [], [], [], []
    saved_layers, scored, offset = 0.0, 0, 0
    for i, ids in enumerate(chunks):
        start = max(prompt_positions, held.prompt_lens[i] if held.prompt_lens else 0)
        with early_exit(model, exit_model, threshold, rule=rule, positions="all", propagate=propagate,
                        prompt_positions=start) as stats:
            logits = model(ids.to(device), use_cache=False).logits[0].float()
        length = ids.shape[1]
        saved_layers += stats.wanted_saved_fraction * stats.tokens * stats.n_layers
        rows = slice(offset + start, offset + length)
        offset += length
        scored += length - start
        top1 = held.records.top1[rows]
        agree.append((logits[start:].argmax(-1).cpu() == top1).float())
        full = adapter.readout(held.records.last[rows].to(device, adapter.unembed.weight.dtype)).float().log_softmax(-1)
        logq = logits[start:].log_softmax(-1)
        kl.append((full.exp() * (full - logq)).sum(-1).cpu())
        nxt = ids[0, start + 1:].to(device)
        nll.append(-logq[:-1].gather(1, nxt[:, None])[:, 0].cpu())
        full_nll.append(-held.records.logprob_next[rows][:-1])
    exit_nll, full_nll = torch.cat(nll), torch.cat(full_nll)
    return {
        "agreement": float(torch.cat(agree).mean()),
        "saved": saved_layers / max(1, scored * Adapter(model).n_layers),
        "perplexity": math.exp(float(exit_nll.mean())),
        "perplexity_full": math.exp(float(full_nll.mean())),
        "kl": float(torch.cat(kl).mean()),
        "tokens": scored,
    }


def _generate(model, ids, max_new_tokens: int, mask=None) -> tuple[torch.Tensor, float, float]:
    """Greedy continuation of exactly ``max_new_tokens``; (new tokens, wall seconds, CPU seconds)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = model.generate(ids, attention_mask=torch.ones_like(ids) if mask is None else mask,
                         max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return out[:, ids.shape[1]:].cpu(), time.perf_counter() - wall, time.process_time() - cpu


@torch.no_grad()
def generation_runs(model, prompts: list[torch.Tensor], exit_model: ExitModel, settings: list[tuple[str, float]],
                    max_new_tokens: int = 32, repeats: int = 3) -> dict:
    """Greedy batch-1 generation: plain and each (rule, threshold), interleaved per prompt and repeat.

    Speed is the median over runs of tokens/s (wall clock); ``cpu_speedup`` is the same ratio on
    process CPU time, which other programs sharing the CPU disturb less.
    """
    device = next(model.parameters()).device
    prompts = [p.to(device) for p in prompts]
    _generate(model, prompts[0], 4)  # warm-up
    keys = ["plain"] + list(settings)
    wall: dict = {k: [] for k in keys}
    cpu: dict = {k: [] for k in keys}
    outs: dict = {k: [] for k in keys}
    saved: dict = {k: [] for k in keys}
    for r in range(repeats):
        for ids in prompts:
            for key in keys:
                if key == "plain":
                    tokens, w, c = _generate(model, ids, max_new_tokens)
                else:
                    with early_exit(model, exit_model, key[1], rule=key[0]) as stats:
                        tokens, w, c = _generate(model, ids, max_new_tokens)
                    saved[key].append(stats.layers_saved_fraction)
                wall[key].append(max_new_tokens / w)
                cpu[key].append(max_new_tokens / c)
                if r == 0:
                    outs[key].append(tokens)
    plain_speed, plain_cpu = statistics.median(wall["plain"]), statistics.median(cpu["plain"])
    result = {"plain_tokens_per_s": plain_speed}
    for s in settings:
        same = [torch.equal(a, b) for a, b in zip(outs[s], outs["plain"])]
        speed = statistics.median(wall[s])
        result[s] = {"greedy_exact": float(np.mean(same)), "tokens_per_s": speed, "speedup": speed / plain_speed,
                     "cpu_speedup": statistics.median(cpu[s]) / plain_cpu, "saved": float(np.mean(saved[s]))}
    return result


@torch.no_grad()
def batch_run(model, prompts: list[torch.Tensor], exit_model: ExitModel, rule: str, threshold: float,
              max_new_tokens: int = 32, repeats: int = 3) -> dict:
    """One left-padded batch of all ``prompts``: compute really skipped vs what rows wanted, speed vs plain."""
    device = next(model.parameters()).device
    width = max(p.shape[1] for p in prompts)
    pad = model.generation_config.pad_token_id or 0
    ids = torch.stack([torch.cat([torch.full((width - p.shape[1],), pad), p[0].cpu()]) for p in prompts]).to(device)
    mask = torch.stack([torch.cat([torch.zeros(width - p.shape[1]), torch.ones(p.shape[1])]) for p in prompts]).long().to(device)
    plain, fast, cpu_plain, cpu_fast = [], [], [], []
    for _ in range(repeats):
        _, w, c = _generate(model, ids, max_new_tokens, mask)
        plain.append(w)
        cpu_plain.append(c)
        with early_exit(model, exit_model, threshold, rule=rule) as stats:
            _, w, c = _generate(model, ids, max_new_tokens, mask)
        fast.append(w)
        cpu_fast.append(c)
    return {"batch": len(prompts), "saved": stats.layers_saved_fraction, "wanted": stats.wanted_saved_fraction,
            "speedup": statistics.median(plain) / statistics.median(fast),
            "cpu_speedup": statistics.median(cpu_plain) / statistics.median(cpu_fast)}


@torch.no_grad()
def propagation_study(model, held: Heldout, exit_model: ExitModel, threshold: float, max_chunks: int = 8) -> dict:
    """Quality of the K/V schemes at one threshold, teacher forced.

    ``exact``: the simulation, whose later tokens read the full model's K/V at every layer;
    ``recompute``: the runtime computing every layer (the same, as a check of the runtime, and
    what ``"defer"`` gives); ``hidden``: K/V of skipped layers computed from the exited state
    (CALM); ``mapped``: from the mapped state. Position 0 (the attention sink) never exits, as
    it is part of the prompt in generation.
    """
    n_layers = Adapter(model).n_layers
    n = sum(c.shape[1] for c in held.chunks[:max_chunks])
    exits = classifier_exits(held.logits[:n], held.records.layers, n_layers, threshold)
    saved, agree = outcome(exits, held.correct[:n], held.records.layers, n_layers)
    out = {"exact": {"saved": saved, "agreement": agree}}
    for scheme in ("recompute", "hidden", "mapped"):
        tf = teacher_forced(model, held, exit_model, "classifier", threshold, max_chunks, scheme, prompt_positions=1)
        out[scheme] = {key: tf[key] for key in ("saved", "agreement", "perplexity")}
    return out


@torch.no_grad()
def step_costs(model, tokenizer, exit_model: ExitModel, exit_after: list[int], steps: int = 24, repeats: int = 5,
               propagate: str = "defer") -> dict:
    """CPU time of one decode step: plain, and with every token forced to exit after each layer in
    ``exit_after``, K/V filled by ``propagate`` (for ``"defer"``, completing the cache at the end is
    included). The slope against the number of layers skipped is what one skipped layer really saves."""
    from steer.maps import LayerMaps

    device = next(model.parameters()).device
    d = exit_model.d_model
    ids = tokenizer("The function returns the number of items in the sequence", return_tensors="pt").input_ids.to(device)

    def per_step(context=None) -> float:
        times = []
        for _ in range(repeats):
            cpu = time.process_time()
            with context() if context else contextlib.nullcontext():  # exit included: "defer" completes the cache there
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps,
                               do_sample=False)
            times.append((time.process_time() - cpu) / steps)
        return statistics.median(times)

    per_step()
    result = {"plain": per_step()}
    for layer in exit_after:
        forced = ExitModel(exit_model.model_name, exit_model.fingerprint, exit_model.n_layers, d,
                           LayerMaps([layer], exit_model.maps.weight[exit_model.maps._position[layer]][None].clone(),
                                     exit_model.maps.bias[exit_model.maps._position[layer]][None].clone())
                           if layer in exit_model.maps else LayerMaps.identity([layer], d),
                           [layer], torch.zeros(1, d), torch.full((1,), 50.0))
        result[layer] = per_step(lambda: early_exit(model, forced, 0.5, propagate=propagate))
    return result


def held_prompts(held: Heldout, n: int, length: int = 48) -> list[torch.Tensor]:
    """``n`` prompts of ``length`` tokens, cut from different held-out chunks."""
    step = max(1, len(held.chunks) // max(n, 1))
    return [held.chunks[i * step][:, :length] for i in range(min(n, len(held.chunks)))]


@dataclass
class Row:
    rule: str
    threshold: float
    saved_sim: float
    agreement_sim: float
    saved_real: float = float("nan")
    agreement_real: float = float("nan")
    perplexity_change: float = float("nan")
    greedy_exact: float = float("nan")
    speedup: float = float("nan")


@dataclass
class Report:
    rows: list[Row]
    oracle_saved: float
    saved_at_95: dict
    curves: dict
    plain_tokens_per_s: float
    perplexity_full: float
    tokens: int

    def table(self) -> str:
        head = (f"{'rule':<11}{'thresh':>7}{'saved':>8}{'agree':>8}{'saved*':>8}{'agree*':>8}"
                f"{'ppl chg':>9}{'greedy=':>9}{'tok/s x':>9}")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(f"{r.rule:<11}{r.threshold:>7.3g}{r.saved_sim:>8.1%}{r.agreement_sim:>8.1%}"
                         f"{_pct(r.saved_real):>8}{_pct(r.agreement_real):>8}{_pct(r.perplexity_change, '+.1%'):>9}"
                         f"{_pct(r.greedy_exact):>9}{_num(r.speedup):>9}")
        lines.append("-" * len(head))
        lines.append(f"oracle (simulated ceiling at these check layers): saved {self.oracle_saved:.1%} at 100% agreement")
        lines.append("saved at >=95% agreement (simulated): " + ", ".join(
            f"{rule} {v:.1%}" for rule, v in self.saved_at_95.items()))
        lines.append(f"plain generate: {self.plain_tokens_per_s:.2f} tokens/s; held-out perplexity {self.perplexity_full:.2f} "
                     f"over {self.tokens} tokens")
        lines.append("saved/agree: simulated (teacher forced, full-model K/V); saved*/agree*: real early exit, "
                     "teacher forced, K/V propagated; ppl chg: perplexity of the held-out text vs the full model; "
                     "greedy=: greedy continuations identical to plain generate; tok/s x: speed vs plain generate "
                     "(batch 1, medians)")
        return "\n".join(lines)

    def to_json(self) -> str:
        data = asdict(self)
        data["curves"] = {k: [list(p) for p in v] for k, v in self.curves.items()}
        return json.dumps(data, indent=1, default=float)


def _pct(x: float, fmt: str = ".1%") -> str:
    return "-" if x != x else format(x, fmt)


def _num(x: float) -> str:
    return "-" if x != x else f"{x:.3f}"


def plot(report: Report, path: str | Path, title: str = "") -> Path:
    """Saved vs agreement: simulated curves, real points, the oracle, the 95% line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colors = {"classifier": "tab:blue", "confidence": "tab:orange"}
    labels = {"classifier": "classifier on cheap features (ours)", "confidence": "mapped top-prob >= t (baseline)"}
    for rule, points in report.curves.items():
        pts = sorted((s, a) for _, s, a in points)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colors.get(rule), label=labels.get(rule, rule) + ", simulated")
    for row in report.rows:
        if row.saved_real == row.saved_real:
            ax.plot(row.saved_real, row.agreement_real, "o", color=colors.get(row.rule), mfc="none", ms=7)
    ax.plot([], [], "o", color="gray", mfc="none", label="real early exit (K/V propagated)")
    ax.plot(report.oracle_saved, 1.0, "*", color="tab:green", ms=14, label=f"oracle ({report.oracle_saved:.0%})")
    ax.axhline(0.95, color="gray", ls="--", lw=0.8)
    ax.set_xlabel("share of layer compute saved")
    ax.set_ylabel("top-1 agreement with the full model")
    ax.set_xlim(0, max(0.4, report.oracle_saved + 0.05))
    ax.set_ylim(0.8, 1.005)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def evaluate(model, tokenizer, text: str, exit_model: ExitModel, *, thresholds: dict | None = None,
             max_tokens: int = 4096, real_chunks: int = 8, prompts: int = 4, max_new_tokens: int = 32,
             repeats: int = 3, log=print) -> Report:
    """Everything in the module docstring; ``thresholds`` maps rule -> thresholds for real runs
    (default: for each rule, the threshold reaching 95% simulated agreement, and one either side)."""
    n_layers = Adapter(model).n_layers
    log(f"teacher-forced pass over up to {max_tokens} held-out tokens ...")
    held = prepare(model, tokenizer, text, exit_model, max_tokens)
    sim = simulated_curves(held, n_layers)
    if thresholds is None:  # the fit's choice, and the held-out curve's 95% point with one either side
        t95 = threshold_for(sim["curves"]["classifier"])
        thresholds = {"classifier": sorted({exit_model.default_threshold, t95, round(max(0.0, t95 - 0.1), 3),
                                            round(min(1.0, t95 + 0.1), 3)}),
                      "confidence": [threshold_for(sim["curves"]["confidence"])]}
    rows = []
    lookup = {rule: {t: (s, a) for t, s, a in points} for rule, points in sim["curves"].items()}
    for rule, ts in thresholds.items():
        for t in ts:
            s, a = lookup[rule].get(t) or outcome(
                (classifier_exits(held.logits, held.records.layers, n_layers, t) if rule == "classifier"
                 else confidence_exits(held.top_prob, held.records.layers, n_layers, t)),
                held.correct, held.records.layers, n_layers)
            rows.append(Row(rule, t, s, a))
    ppl_full = float("nan")
    for row in rows:
        log(f"real teacher-forced run: {row.rule} at {row.threshold} ...")
        tf = teacher_forced(model, held, exit_model, row.rule, row.threshold, real_chunks)
        row.saved_real, row.agreement_real = tf["saved"], tf["agreement"]
        row.perplexity_change = tf["perplexity"] / tf["perplexity_full"] - 1
        ppl_full = tf["perplexity_full"]
    plain = float("nan")
    if prompts:
        log(f"greedy generation, {prompts} prompts x {max_new_tokens} tokens x {repeats} repeats ...")
        settings = [(r.rule, r.threshold) for r in rows]
        gen = generation_runs(model, held_prompts(held, prompts), exit_model, settings, max_new_tokens, repeats)
        plain = gen["plain_tokens_per_s"]
        for row in rows:
            row.greedy_exact, row.speedup = gen[(row.rule, row.threshold)]["greedy_exact"], gen[(row.rule, row.threshold)]["speedup"]
    return Report(rows, sim["oracle_saved"], sim["saved_at_95"], sim["curves"], plain, ppl_full,
                  int(held.records.top1.shape[0]))
