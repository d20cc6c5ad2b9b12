"""The concept-steering protocol (PPLM / GeDi / DExperts style): neutral prompts, steer toward a
concept, judge the continuations.

For every prompt, ``samples`` nucleus-sampled continuations (p = 0.9, 20 new tokens by default)
under one :class:`Method` (FFN spec, logits processors such as logit bias or activation
addition, or an instruction through the chat template). Batch ``b`` always holds the same prompts
and draws from the same seed, so every method sees the same prompts, seeds and samples.
Reported per run:

* success: share of continuations the judge accepts (VADER positive / negative, topic judge list);
* perplexity of each continuation given its *plain* prompt under the unsteered model (mean);
* distinct-1/2/3 over each prompt's samples (mean over prompts).

Generation and judging are separate (:func:`generate_records`, :func:`summarize_records`), so a
GPU machine without the judges can generate and another machine can score the saved records.
"""
from __future__ import annotations

import json
import math
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from steer.spec import Spec
from steer.steering import steering

from .diversity import distinct_n
from .perplexity import token_perplexity
from .protocol import batch_seed, sampling_kwargs

PPL_RISE = 0.10  # the perplexity budget the benchmarks compare methods at


@dataclass(frozen=True)
class Method:
    """One steering method at one strength (what one run of the protocol applies)."""

    family: str  # none, prompting, logit-bias, act-add, ffn-ranking, ffn-built, or any label
    strength: float = 0.0
    spec: Spec | None = None
    processors: tuple = ()
    instruction: str | None = None
    info: dict = field(default_factory=dict, compare=False)

    @property
    def label(self) -> str:
        return self.family if self.family == "none" else f"{self.family}@{self.strength:g}"


def _inputs(tokenizer, prompts: Sequence[str], method: Method) -> list[str]:
    if method.instruction is None:
        return list(prompts)
    from steer.baselines import instructed

    return instructed(tokenizer, prompts, method.instruction)


@torch.no_grad()
def generate_records(model, tokenizer, prompts: Sequence[str], method: Method, *, samples: int = 5,
                     top_p: float = 0.9, max_new_tokens: int = 20, seed: int = 0, batch_size: int = 64) -> list[dict]:
    """One row per prompt: ``{"prompt", "continuations", "perplexity"}`` (module docstring)."""
    device = next(model.parameters()).device
    per_batch = max(1, batch_size // samples)
    kwargs = sampling_kwargs(tokenizer, top_p, max_new_tokens)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    rows = []
    for b, start in enumerate(range(0, len(prompts), per_batch)):
        chunk = list(prompts[start:start + per_batch])
        enc = tokenizer(_inputs(tokenizer, chunk, method), return_tensors="pt", padding=True).to(device)
        torch.manual_seed(batch_seed(seed, b))
        with ExitStack() as stack:
            if method.spec is not None:
                stack.enter_context(steering(model, method.spec))
            out = model.generate(**enc, num_return_sequences=samples, logits_processor=list(method.processors),
                                 **kwargs)
        new = out[:, enc["input_ids"].shape[1]:].tolist()
        cut = [next((i for i, t in enumerate(ids) if t in eos), len(ids)) for ids in new]
        new = [ids[:n] for ids, n in zip(new, cut)]
        plain = [tokenizer(p).input_ids for p in chunk]  # the judge reads the plain prompt, whatever the method fed
        ppl = token_perplexity(model, [plain[k // samples] for k in range(len(new))], new,
                               tokenizer.pad_token_id or 0, batch_size)
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        for j, prompt in enumerate(chunk):
            part = slice(j * samples, (j + 1) * samples)
            rows.append({"prompt": prompt, "continuations": texts[part], "perplexity": ppl[part]})
    return rows


def summarize_records(rows: list[dict], judge) -> dict[str, Any]:
    """Success (share the judge accepts), mean perplexity and distinct-n of a run's rows."""
    texts = [c for r in rows for c in r["continuations"]]
    judged = judge.judged(texts) if judge is not None else [False] * len(texts)
    ppl = np.array([p for r in rows for p in r["perplexity"]], dtype=float)
    out: dict[str, Any] = dict(success=float(np.mean(judged)) if texts else math.nan,
                               perplexity=float(np.nanmean(ppl)) if np.isfinite(ppl).any() else math.nan,
                               n_prompts=len(rows), n_continuations=len(texts),
                               judge=getattr(judge, "name", "none"))
    for n in (1, 2, 3):
        values = [distinct_n(r["continuations"], n) for r in rows]
        out[f"distinct_{n}"] = float(np.nanmean(values)) if any(map(math.isfinite, values)) else math.nan
    return out


def save_run(path: str | Path, meta: dict, rows: list[dict]) -> Path:
    """One run as JSONL: a header line with ``meta``, then one row per prompt (written atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(json.dumps(x) for x in [{"meta": meta}] + rows) + "\n", encoding="utf-8")
    tmp.rename(path)
    return path


def load_run(path: str | Path) -> tuple[dict, list[dict]]:
    lines = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines or "meta" not in lines[0]:
        raise ValueError(f"{path}: not a run file (no meta header)")
    return lines[0]["meta"], lines[1:]


DISTINCT_DROP = 0.10  # a run whose distinct-2 falls more than this below unsteered is degenerate, whatever its perplexity


def fits_budget(summary: dict, base_perplexity: float, budget: float = PPL_RISE,
                base_distinct: float | None = None) -> bool:
    """Perplexity rise at most ``budget`` and (given ``base_distinct``) distinct-2 not collapsed: repetitive
    text can have a *low* judge perplexity, so perplexity alone would accept it."""
    ok = summary["perplexity"] <= base_perplexity * (1 + budget) + 1e-9
    if base_distinct is not None and math.isfinite(base_distinct):
        ok = ok and summary["distinct_2"] >= base_distinct * (1 - DISTINCT_DROP)
    return ok


def best_within(summaries: list[dict], base_perplexity: float, budget: float = PPL_RISE,
                base_distinct: float | None = None) -> dict | None:
    """The run with the highest success that :func:`fits_budget`."""
    fits = [s for s in summaries if fits_budget(s, base_perplexity, budget, base_distinct)]
    return max(fits, key=lambda s: s["success"]) if fits else None


def pareto_front(summaries: list[dict]) -> list[dict]:
    """Runs no other run beats on both success (higher) and perplexity (lower)."""
    return [s for s in summaries if not any(o["success"] >= s["success"] and o["perplexity"] <= s["perplexity"]
                                            and (o["success"], o["perplexity"]) != (s["success"], s["perplexity"])
                                            for o in summaries)]


def markdown_table(summaries: list[dict], base_perplexity: float | None = None, budget: float = PPL_RISE,
                   base_distinct: float | None = None) -> str:
    """Runs as a table: method, strength, success, perplexity (and its rise), distinct-n, within budget."""
    head = ("| method | strength | success | perplexity | ppl rise | dist-1 | dist-2 | dist-3 | within +"
            f"{budget:.0%} ppl{' (dist-2 kept)' if base_distinct is not None else ''} |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|:---:|\n")
    lines = []
    for s in summaries:
        rise = s["perplexity"] / base_perplexity - 1 if base_perplexity else math.nan
        ok = ("yes" if fits_budget(s, base_perplexity, budget, base_distinct) else "") if base_perplexity else "-"
        strength = "-" if s["method"] == "none" else f"{s['strength']:g}"
        lines.append(f"| {s['method']} | {strength} | {s['success']:.3f} | {s['perplexity']:.2f} | {rise:+.1%} | "
                     f"{s['distinct_1']:.3f} | {s['distinct_2']:.3f} | {s['distinct_3']:.3f} | {ok} |")
    return head + "\n".join(lines) + "\n"


TASKS = ("sentiment", "topic")


def get_judge(task: str, concept: str):
    """The judge of a task: VADER toward ``concept`` (positive / negative) or a topic's judge word list."""
    if task == "sentiment":
        from .sentiment import VaderScorer

        return VaderScorer(concept)
    if task == "topic":
        from .topic import TopicJudge

        return TopicJudge(concept.removeprefix("topic:"))
    raise ValueError(f"unknown task {task!r}: use sentiment or topic (toxicity runs the RealToxicityPrompts protocol)")


def run_task(model, tokenizer, task: str, concept: str, methods: Sequence[Method], prompts: Sequence[str], *,
             samples: int = 5, top_p: float = 0.9, max_new_tokens: int = 20, seed: int = 0, batch_size: int = 64,
             out_dir: str | Path | None = None) -> list[dict]:
    """Every method on the same prompts and seeds, judged for ``task``; a saved run in ``out_dir`` is reused."""
    judge = get_judge(task, concept)
    summaries = []
    for method in methods:
        path = Path(out_dir) / f"{method.label}.jsonl" if out_dir is not None else None
        if path is not None and path.exists():
            rows = load_run(path)[1]
        else:
            rows = generate_records(model, tokenizer, prompts, method, samples=samples, top_p=top_p,
                                    max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)
            if path is not None:
                save_run(path, dict(method=method.family, strength=method.strength, concept=concept, task=task,
                                    samples=samples, seed=seed), rows)
        summaries.append(dict(summarize_records(rows, judge), method=method.label if method.family != "none" else "none",
                              strength=method.strength))
    return summaries
