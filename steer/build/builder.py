"""The builder: value-vector edits that move a concept up or down, chosen by measured effect.

Any target is a set of *spans* in text: words a scorer flags (``score(words) -> [0, 1]``), e.g.
the toxicity classifier (steer.build.detox), a concept's word list or a sentiment lexicon
(steer.build.concept). ``down`` lowers the spans' log-likelihood, ``up`` raises it. Steps:

1. **Selection text, never the evaluation prompts.** The caller's selection prompts, each
   continued by the model itself (nucleus sampling, like the evaluation). Every fourth source
   line is held out to choose the count (the *held-out selection* prompts).
2. **Spans.** Words of those samples the scorer flags. Since the model rarely writes a concept
   by chance, the concept's words (and the clearest flagged words it wrote) are also *forced*
   after the forcing prompts and, optionally, in the middle of its own samples, each weighted by
   how likely the model finds it there.
3. **Attribution.** One forward and two backward passes per batch give the gradient of (a) the
   spans' log-likelihood and (b) each sample's log-likelihood with respect to every FFN
   coefficient at every position. From them, for every value vector at once and in closed form:
   the first-order change of the spans' log-likelihood under ``set a = t`` or ``scale a by s``,
   and the KL divergence the edit causes on the model's own text (Fisher information from its
   samples: ``KL ~ 1/2 E[(d log p(sample) / d edit)^2]``).
4. **Per-vector value.** The ``t`` or ``s`` maximizing ``gain - lam * KL`` (a quadratic, so
   exact), clipped to the range of the vector's own activations on the samples. The vocabulary
   projection is the prior: a vector whose edit writes the concept's tokens (mean z-score in its
   projection, :class:`steer.ConceptScorer`) has its net gain multiplied by
   ``1 + prior_weight * z``; the measurement still decides, the prior breaks near-ties.
5. **How many.** Vectors ranked by that; the count (and ``lam``) is chosen on the held-out
   selection samples by a teacher-forced check of the real edit: the largest gain whose
   estimated judge-perplexity rise, ``exp(CE(steered, unsteered) - H(unsteered)) - 1`` per token
   (what the evaluation measures, in expectation), stays within a budget.

Steps 1-2 live in :mod:`.samples`, 3 in :mod:`.attribution`, 4 in :mod:`.edits`, 5's check in
:mod:`.heldout`; this module is the pipeline that runs them. Naming: the span fields are called
``toxic`` / ``tox_*`` for history (detox was the first target).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from steer.families import Adapter
from steer.presets import fingerprint
from steer.spec import Spec

DIRECTIONS = ("up", "down")


def split_groups(groups: Sequence[Sequence[str]], every: int = 4) -> tuple[list[str], list[str]]:
    """(selection, held-out): every ``every``-th source line goes to held-out, with all its fills."""
    select, held = [], []
    for i, group in enumerate(groups):
        (held if i % every == every - 1 else select).extend(group)
    return select, held


from .samples import Sample, _last_logits, _words, forced_samples, mark_toxic, sample_continuations
from .attribution import Attribution, attribute
from .edits import candidates, spec_from
from .heldout import HeldOut


# -- the whole pipeline --------------------------------------------------------------------------
PPL_BUDGET = 0.06  # estimated judge-perplexity rise on held-out samples (the targets allow 0.10)
COUNTS = (10, 20, 30, 40, 60, 80, 120, 160)
LAMS = (1.0, 2.0, 4.0)
FORCED_THRESHOLD = 0.9  # a word the model wrote is forced on other prompts only when clearly flagged


def _say(progress: Callable[[str], None] | None, message: str) -> None:
    if progress:
        progress(message)


def _cached_samples(work_dir: Path | None, key: dict, make: Callable[[], list[Sample]]) -> list[Sample]:
    """``make()``, saved under ``work_dir`` keyed by ``key`` so an interrupted build resumes."""
    if work_dir is None:
        return make()
    import hashlib

    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    path = work_dir / f"samples-{key['part']}-{digest}.json"
    if path.exists():
        return [Sample(**row) for row in json.loads(path.read_text())]
    samples = make()
    work_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([s.__dict__ for s in samples]))
    tmp.rename(path)
    return samples




@dataclass
class Target:
    """What a build moves: the words ``score`` flags (>= ``threshold``), made more (up) or less (down) likely.

    ``words``: forced after the forcing prompts (with the flagged words the model wrote itself
    whose score reaches ``forced_threshold``). ``prior``: see :func:`candidates`.
    """

    name: str
    score: Callable[[list[str]], list[float]]
    direction: str = "down"
    words: Sequence[str] = ()
    prior: torch.Tensor | None = None
    prior_weight: float = 0.0
    threshold: float = 0.5
    forced_threshold: float = FORCED_THRESHOLD
    widen: float = 1.0  # see candidates()

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be 'up' or 'down', got {self.direction!r}")


def _flip(att: Attribution) -> Attribution:
    """The attribution of the spans' *negative* log-likelihood: ``up`` maximizes what ``down`` minimizes."""
    return Attribution(**{**att.__dict__, "tox_g": -att.tox_g, "tox_ga": -att.tox_ga})


def _mid_sample_prompts(tokenizer, samples: list[Sample], per_sample: int, seed: int) -> list[str]:
    """Prompt + the first words of one of its samples, cut at a word start: more places to force the target."""
    rng = random.Random(seed)
    out = []
    for s in samples:
        words = _words(tokenizer, s.continuation_ids)
        for _ in range(per_sample):
            if len(words) < 3:
                break
            cut = words[rng.randrange(1, len(words) - 1)][1][0]
            out.append(tokenizer.decode(s.prompt_ids + s.continuation_ids[:cut], skip_special_tokens=True))
    return out


def build_spec(model, tokenizer, target: Target, *, force: Sequence[Sequence[str]],
               background: Sequence[Sequence[str]] = (), count: int | None = None, lam: float | None = None,
               counts: Sequence[int] = COUNTS, lams: Sequence[float] = LAMS, ppl_budget: float = PPL_BUDGET,
               samples: int = 4, max_new_tokens: int = 20, forced_per_prompt: int = 6, mid_sample: int = 0,
               batch_size: int = 16, seed: int = 0, name: str | None = None, work_dir: str | Path | None = None,
               progress: Callable[[str], None] | None = None, **extra_meta) -> Spec:
    """Choose value-vector edits that move ``target`` at a bounded fluency cost (module docstring).

    ``force``: groups of selection prompts (a group shares a source line) that are sampled *and*
    after which the target's words are forced; ``background``: groups only sampled (their text
    prices fluency). Every fourth group of each is held out to choose ``count`` / ``lam``.
    ``mid_sample``: also force the words at that many random word starts of each own sample.
    ``work_dir`` keeps the sampled text, so a rerun (or an interrupted build) skips sampling.
    """
    if samples < 1 or max_new_tokens < 1 or batch_size < 1 or forced_per_prompt < 0 or mid_sample < 0:
        raise ValueError("samples, max_new_tokens and batch_size must be at least 1; forced_per_prompt, mid_sample >= 0")
    if count is not None and count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if lam is not None and not lam > 0:
        raise ValueError(f"lam must be positive, got {lam}")
    Adapter(model)
    name = name or f"{target.name}-{target.direction}"
    force_groups = [list(g) for g in force]
    back_groups = [list(g) for g in background]
    if len(force_groups) + len(back_groups) < 4 or not force_groups:
        raise ValueError("need at least 4 selection prompt groups, some to force after (every fourth is held out)")
    f_sel, f_held = split_groups(force_groups, min(4, len(force_groups)))
    b_sel, b_held = split_groups(back_groups, min(4, len(back_groups))) if back_groups else ([], [])
    score = target.score
    folder = Path(work_dir) if work_dir is not None else None
    runs: dict[str, list[Sample]] = {}
    marked: dict[str, list[str]] = {}
    for part, prompts in (("selection", f_sel + b_sel), ("held-out", f_held + b_held)):
        part_seed = seed * 2 + (part == "held-out")
        key = dict(part=part, model=fingerprint(model), prompts=prompts, samples=samples,
                   max_new_tokens=max_new_tokens, seed=part_seed)
        _say(progress, f"{part}: sampling {len(prompts)} prompts x {samples}")
        runs[part] = _cached_samples(folder, key, lambda: sample_continuations(
            model, tokenizer, prompts, samples, max_new_tokens, seed=part_seed, batch_size=max(batch_size, 4 * samples)))
        marked[part] = mark_toxic(runs[part], tokenizer, score, target.threshold)
        _say(progress, f"{part}: {len(marked[part])} {target.name} words in {len(runs[part])} samples")
    # forced continuations: the target's words and the clearest flagged words the model wrote itself
    seen = sorted({w.lower() for w in marked["selection"] if w.isalpha() and len(w) >= 3})
    words = sorted({w.strip() for w in target.words if w.strip()}
                   | {w for w, p in zip(seen, score(seen) if seen else []) if p >= target.forced_threshold})
    forced = {"selection": [], "held-out": []}
    if forced_per_prompt and words:
        for part, prompts in (("selection", f_sel), ("held-out", f_held)):
            contexts = list(prompts)
            if mid_sample:
                mine = set(prompts)
                own = [s for s in runs[part] if tokenizer.decode(s.prompt_ids, skip_special_tokens=True) in mine]
                contexts += _mid_sample_prompts(tokenizer, own, mid_sample, seed)
            forced[part] = forced_samples(model, tokenizer, contexts, words, forced_per_prompt, batch_size)
    if not any(any(s.toxic) for s in runs["selection"] + forced["selection"]):
        raise ValueError(f"the selection samples contain no {target.name} word: nothing to learn from; "
                         "use more samples, other prompts or more words")
    _say(progress, f"attributing {len(runs['selection'])} samples + {len(forced['selection'])} forced continuations")
    att = attribute(model, runs["selection"] + forced["selection"], batch_size=batch_size, seed=seed)
    if target.direction == "up":
        att = _flip(att)
    held = HeldOut(model, runs["held-out"] + forced["held-out"], batch_size=batch_size)
    sign = -1.0 if target.direction == "up" else 1.0  # gain = sign * drop of the spans' log-likelihood
    results = []
    for lam_ in [lam] if lam is not None else lams:
        ranked = candidates(att, lam_, target.prior, target.prior_weight, target.direction, target.widen)
        for count_ in [count] if count is not None else counts:
            chosen = ranked[:count_]
            if not chosen or any(r[0] == lam_ and r[1] == len(chosen) for r in results):
                break
            result = held.check(spec_from(chosen, model, name))
            results.append((lam_, len(chosen), result, chosen))
            _say(progress, f"lam {lam_:g} count {len(chosen)}: held-out {target.name} log-likelihood "
                           f"{-result.toxic_drop:+.3f} nats, KL {result.kl:.4f} nats/token, "
                           f"perplexity {result.ppl_rise:+.1%}")
            if result.ppl_rise > ppl_budget:
                break  # more vectors only cost more
    if not results:
        raise ValueError(f"no value-vector edit moves {target.name} {target.direction} on the selection samples")
    fits = [r for r in results if r[2].ppl_rise <= ppl_budget] or [min(results, key=lambda r: r[2].ppl_rise)]
    lam_, count_, result, chosen = max(fits, key=lambda r: sign * r[2].toxic_drop)
    meta = dict(method=f"gradient attribution: {target.name} span log-likelihood ({target.direction}) vs Fisher KL "
                       "on the model's own samples", target=target.name, direction=target.direction,
                lam=lam_, count=count_, ppl_budget=ppl_budget, prior_weight=target.prior_weight,
                held_out_change=round(-result.toxic_drop, 4), held_out_kl=round(result.kl, 5),
                held_out_ppl_rise=round(result.ppl_rise, 4), held_out_ratio=round(result.toxic_mass, 4),
                selection_samples=len(runs["selection"]), forced_continuations=len(forced["selection"]),
                held_out_samples=len(runs["held-out"]), spans=round(att.n_spans, 2),
                selection_prompt_count=len(f_sel + b_sel), **extra_meta, fingerprint=fingerprint(model))
    return spec_from(chosen, model, name, **meta)


@torch.no_grad()
def next_token_effect(model, tokenizer, spec: Spec, prompts: Sequence[str], top: int = 15,
                      min_probability: float = 1e-4) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """What ``spec`` does to the next token after ``prompts``: (most lowered, most raised) tokens.

    Each token's score is ``log(mean p_steered / mean p_unsteered)`` over the prompts, for tokens
    whose mean unsteered probability is at least ``min_probability`` (rarer ones do not matter).
    """
    from steer.steering import steering

    device = next(model.parameters()).device
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True).to(device)  # left padded: prompts end together
    base = torch.softmax(_last_logits(model, enc), -1).mean(0)
    with steering(model, spec):
        steered = torch.softmax(_last_logits(model, enc), -1).mean(0)
    change = (steered.clamp_min(1e-12) / base).log().masked_fill(base < min_probability, float("nan"))
    valid = (~change.isnan()).nonzero()[:, 0]
    order = change[valid].argsort()
    pick = lambda ids: [(tokenizer.decode([int(i)]), round(float(change[i]), 3)) for i in ids]  # noqa: E731
    return pick(valid[order[:top]]), pick(valid[order.flip(0)[:top]])

