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

Naming: the span fields are called ``toxic`` / ``tox_*`` for history (detox was the first target).
"""
from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from steer.families import Adapter
from steer.hooks import hooks
from steer.models import position_ids
from steer.presets import fingerprint
from steer.spec import Spec

DIRECTIONS = ("up", "down")


def split_groups(groups: Sequence[Sequence[str]], every: int = 4) -> tuple[list[str], list[str]]:
    """(selection, held-out): every ``every``-th source line goes to held-out, with all its fills."""
    select, held = [], []
    for i, group in enumerate(groups):
        (held if i % every == every - 1 else select).extend(group)
    return select, held


# -- samples and spans ---------------------------------------------------------------------------
@dataclass
class Sample:
    """A prompt and one continuation, as token ids; ``toxic`` marks continuation tokens of toxic words."""

    prompt_ids: list[int]
    continuation_ids: list[int]
    toxic: list[bool] = field(default_factory=list)
    text: str = ""
    weight: float = 1.0  # weight of its toxic spans in the toxic objective
    own: bool = True  # sampled from the model (counts for the KL estimate); False: a forced continuation

    def spans(self) -> int:
        return sum(1 for i, t in enumerate(self.toxic) if t and (i == 0 or not self.toxic[i - 1]))


@torch.no_grad()
def sample_continuations(model, tokenizer, prompts: Sequence[str], samples: int = 4, max_new_tokens: int = 20,
                         top_p: float = 0.9, seed: int = 0, batch_size: int = 64) -> list[Sample]:
    """The model's own nucleus-sampled continuations (as in the evaluation protocol)."""
    device = next(model.parameters()).device
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    per_batch = max(1, batch_size // samples)
    out: list[Sample] = []
    for b, start in enumerate(range(0, len(prompts), per_batch)):
        chunk = list(prompts[start:start + per_batch])
        enc = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
        torch.manual_seed(seed * 1_000_003 + b)
        generated = model.generate(**enc, do_sample=True, top_p=top_p, top_k=0, temperature=1.0,
                                   max_new_tokens=max_new_tokens, num_return_sequences=samples,
                                   pad_token_id=tokenizer.pad_token_id)
        new = generated[:, enc["input_ids"].shape[1]:].tolist()
        prompt_ids = [tokenizer(prompt).input_ids for prompt in chunk]
        for k, ids in enumerate(new):
            cut = next((i for i, t in enumerate(ids) if t in eos), len(ids))
            out.append(Sample(prompt_ids[k // samples], ids[:cut],
                              text=tokenizer.decode(ids[:cut], skip_special_tokens=True)))
    return out


def _words(tokenizer, ids: Sequence[int]) -> list[tuple[str, list[int]]]:
    """Split token ids into words: (word text, positions of its tokens)."""
    words: list[tuple[str, list[int]]] = []
    for i, t in enumerate(ids):
        piece = tokenizer.decode([t])
        starts = not words or piece[:1].isspace() or not piece[:1].isalnum() or not words[-1][0][-1:].isalnum()
        if starts:
            words.append((piece.strip(), [i]))
        else:
            words[-1] = (words[-1][0] + piece, words[-1][1] + [i])
    return [(re.sub(r"[^\w'*@$-]", "", w), pos) for w, pos in words]


def mark_toxic(samples: list[Sample], tokenizer, score: Callable[[list[str]], list[float]],
               threshold: float = 0.5) -> list[str]:
    """Mark the tokens of words that ``score`` flags on their own; returns the marked words (with repeats)."""
    split = [_words(tokenizer, s.continuation_ids) for s in samples]
    vocabulary = sorted({w for words in split for w, _ in words if any(c.isalpha() for c in w)})
    flagged = {w for w, p in zip(vocabulary, score(vocabulary) if vocabulary else []) if p >= threshold}
    found = []
    for sample, words in zip(samples, split):
        sample.toxic = [False] * len(sample.continuation_ids)
        for word, positions in words:
            if word in flagged:
                found.append(word)
                for i in positions:
                    sample.toxic[i] = True
    return found


def _last_logits(model, enc) -> torch.Tensor:
    """Next-token logits after each left-padded prompt of ``enc`` (float32)."""
    return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                 position_ids=position_ids(enc["attention_mask"]), logits_to_keep=1).logits[:, -1].float()


@torch.no_grad()
def forced_samples(model, tokenizer, prompts: Sequence[str], words: Sequence[str], per_prompt: int = 6,
                   batch_size: int = 32) -> list[Sample]:
    """Each prompt continued by the toxic words the model finds most likely there (teacher forced).

    Words are shortlisted by the probability of their first token after the prompt, then ranked
    by the probability of the whole word; the ``per_prompt`` best get weights proportional to it,
    summing to 1 per prompt, so that a prompt counts like one toxic span of the model's own.
    """
    words = sorted({w.strip() for w in words if w.strip()})
    pieces = [tokenizer(" " + w, add_special_tokens=False).input_ids for w in words]
    first = torch.tensor([p[0] for p in pieces])
    device = next(model.parameters()).device
    shortlist: list[Sample] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        enc = tokenizer(chunk, return_tensors="pt", padding=True).to(device)  # left padded: prompts end together
        logp = torch.log_softmax(_last_logits(model, enc), -1).cpu()[:, first]
        for prompt, scores in zip(chunk, logp):
            prompt_ids = tokenizer(prompt).input_ids
            for i in scores.topk(min(2 * per_prompt, len(words))).indices.tolist():
                shortlist.append(Sample(prompt_ids, pieces[i], [True] * len(pieces[i]), words[i], own=False))
    word_logp = []  # log p(whole word | prompt)
    for _, input_ids, mask, cont, *_ in _batches(shortlist, batch_size):
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        word_logp += (_token_logp(logits, input_ids.to(device)) * cont.to(device)).sum(1).tolist()
    out: list[Sample] = []
    per = min(2 * per_prompt, len(words))
    for start in range(0, len(shortlist), per):
        group = shortlist[start:start + per]
        values = torch.tensor(word_logp[start:start + per])
        best = values.topk(min(per_prompt, len(group)))
        for w, i in zip(torch.softmax(best.values, 0).tolist(), best.indices.tolist()):
            group[i].weight = w
            out.append(group[i])
    return out


# -- attribution ---------------------------------------------------------------------------------
@dataclass
class Attribution:
    """Per value vector ``(n_layers, d_ff)`` sums from which every edit's first-order effect follows.

    With ``g`` the gradient of the toxic spans' log-likelihood and ``a`` the coefficient, summed
    over every token of every sample: ``tox_g = sum g``, ``tox_ga = sum g*a``; ``set a=t`` changes
    the toxic log-likelihood by ``t*tox_g - tox_ga``, ``scale by s`` by ``(s-1)*tox_ga``. With ``G``
    (``H``) the per-sample sum of ``d log p(sample)/da`` (times ``a``): ``gg, gh, hh`` are sums
    over samples of ``G*G, G*H, H*H``, so the KL of ``set t`` is about ``(t^2 gg - 2t gh + hh) / 2n``.
    """

    tox_g: torch.Tensor
    tox_ga: torch.Tensor
    gg: torch.Tensor
    gh: torch.Tensor
    hh: torch.Tensor
    low: torch.Tensor  # low / high quantile of the vector's coefficient on the samples
    high: torch.Tensor
    n_spans: float  # toxic spans, weighted
    n_samples: int  # the model's own samples (the KL estimate)

    def save(self, path: str | Path) -> None:
        torch.save(self.__dict__, path)

    @classmethod
    def load(cls, path: str | Path) -> "Attribution":
        return cls(**torch.load(path))


def _batches(samples: list[Sample], batch_size: int):
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        ids = [s.prompt_ids + s.continuation_ids for s in chunk]
        width = max(map(len, ids))
        input_ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        cont = torch.zeros(len(chunk), width, dtype=torch.bool)  # position predicts a continuation token
        toxic = torch.zeros(len(chunk), width, dtype=torch.bool)
        weight = torch.tensor([s.weight for s in chunk], dtype=torch.float64)
        own = torch.tensor([s.own for s in chunk])
        for i, (s, row) in enumerate(zip(chunk, ids)):
            input_ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
            n = len(s.prompt_ids)
            cont[i, n - 1:len(row) - 1] = True
            if s.toxic:
                toxic[i, n - 1:len(row) - 1] = torch.tensor(s.toxic)
        yield chunk, input_ids, mask, cont, toxic, weight, own


def _token_logp(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """``logp[b, t]`` of token ``t+1`` given the prefix up to ``t`` (last column: 0)."""
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, input_ids[:, 1:, None])[..., 0]
    return torch.nn.functional.pad(logp, (0, 1))


def attribute(model, samples: list[Sample], batch_size: int = 16, quantile: float = 0.01,
              reservoir: int = 2000, seed: int = 0) -> Attribution:
    """Gradient statistics of every FFN coefficient over ``samples`` (see :class:`Attribution`)."""
    adapter = Adapter(model)
    device = next(model.parameters()).device
    n_layers, d_ff = adapter.n_layers, adapter.d_ff
    zeros = lambda: torch.zeros(n_layers, d_ff, dtype=torch.float64)  # noqa: E731
    stats = {k: zeros() for k in ("tox_g", "tox_ga", "gg", "gh", "hh")}
    kept: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    generator = torch.Generator().manual_seed(seed)
    total_tokens = sum(len(s.prompt_ids) + len(s.continuation_ids) for s in samples if s.own)
    keep_share = min(1.0, reservoir / max(1, total_tokens))
    # toxic samples first, so the second backward pass only runs where there is a toxic span
    ordered = sorted(samples, key=lambda s: not any(s.toxic))
    captured: dict[int, torch.Tensor] = {}

    def capture(layer):
        def hook(module, args):
            captured[layer] = args[0]
            args[0].retain_grad()
        return hook

    grad_flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)  # gradients of activations only: half the cost of a full backward
    embed = model.get_input_embeddings()
    entries = [(embed, "post", lambda m, a, out: out.requires_grad_())]
    entries += [(adapter.ffn_out(layer), "pre", capture(layer)) for layer in range(n_layers)]
    done = 0
    try:
        with hooks(*entries):
            for chunk, input_ids, mask, cont, toxic, weight, own in _batches(ordered, batch_size):
                input_ids, mask, cont, toxic, weight = (t.to(device) for t in (input_ids, mask, cont, toxic, weight))
                captured.clear()
                logits = model(input_ids=input_ids, attention_mask=mask).logits
                logp = _token_logp(logits, input_ids)
                real = mask.bool()[..., None]
                has_toxic = bool(toxic.any())
                if has_toxic:
                    (logp * toxic * weight[:, None].to(logp.dtype)).sum().backward(retain_graph=bool(own.any()))
                    for layer, a in captured.items():
                        g = (a.grad.double() * real)
                        stats["tox_g"][layer] += g.sum((0, 1)).cpu()
                        stats["tox_ga"][layer] += (g * a.detach().double()).sum((0, 1)).cpu()
                        a.grad = None
                if not own.any():  # forced continuations only: no KL statistics
                    continue
                (logp * cont).sum().backward()
                rows = own.to(device)
                real = (mask.bool() & rows[:, None])[..., None]
                for layer, a in captured.items():
                    g = a.grad.double() * real
                    big_g = g.sum(1)
                    big_h = (g * a.detach().double()).sum(1)
                    stats["gg"][layer] += (big_g * big_g).sum(0).cpu()
                    stats["gh"][layer] += (big_g * big_h).sum(0).cpu()
                    stats["hh"][layer] += (big_h * big_h).sum(0).cpu()
                    values = a.detach()[mask.bool() & rows[:, None]].float().cpu()
                    pick = torch.rand(values.shape[0], generator=generator) < keep_share
                    kept[layer].append(values[pick].half())
    finally:
        for p, flag in zip(model.parameters(), grad_flags):
            p.requires_grad_(flag)
        captured.clear()
    if sum(k.shape[0] for k in kept[0]) > 0:
        values = [torch.cat(k).float() for k in kept]
        low = torch.stack([torch.quantile(v, quantile, dim=0) for v in values])
        high = torch.stack([torch.quantile(v, 1 - quantile, dim=0) for v in values])
    else:  # no sample of the model's own: no activation range known
        low = high = torch.zeros(n_layers, d_ff)
    n_spans = sum(s.weight * s.spans() for s in samples)
    return Attribution(**stats, low=low, high=high, n_spans=n_spans, n_samples=sum(s.own for s in samples))


# -- choosing edits ------------------------------------------------------------------------------
SCALE_RANGE = (-1.0, 1.0)  # "scale" edits shrink a coefficient or flip its sign, never amplify it


@dataclass(frozen=True)
class Candidate:
    layer: int
    index: int
    op: str  # "set" or "scale"
    value: float
    gain: float  # predicted drop of the toxic spans' log-likelihood (nats per span)
    kl: float  # predicted KL per sample (nats)


def _range(att: Attribution, widen: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Values a ``set`` may take: the coefficient's observed range, ``widen`` times as wide around its middle."""
    low, high = att.low.double(), att.high.double()
    if widen == 1:
        return low, high
    middle, half = (low + high) / 2, (high - low) / 2 * widen
    return middle - half, middle + half


def candidates(att: Attribution, lam: float, prior: torch.Tensor | None = None, prior_weight: float = 0.0,
               direction: str = "down", widen: float = 1.0) -> list[Candidate]:
    """Every vector's best single edit under ``gain - lam * kl``, best first (positive net gains only).

    ``prior``: ``(n_layers, d_ff)`` z-score of the target's tokens in each vector's projection (+v).
    A ``set t`` edit writes ``t*v``, so it writes the target when ``sign(t) * z > 0`` (``up``) or
    ``< 0`` (``down``); such an edit ranks by ``net * (1 + prior_weight * aligned z)``.
    ``scale`` edits get no prior (the coefficient's sign varies by token). ``widen``: ``set``
    values may leave the observed range by that factor (raising a concept the model rarely
    writes needs coefficients beyond what its text ever shows; the held-out check still prices them).
    """
    n, m = max(1, att.n_spans), max(1, att.n_samples)
    s1, s2 = att.tox_g / n, att.tox_ga / n
    gg, gh, hh = att.gg / (2 * m), att.gh / (2 * m), att.hh / (2 * m)
    # set a = t: gain(t) = s2 - t*s1, kl(t) = t^2 gg - 2t gh + hh, t within the observed range
    t = ((lam * 2 * gh - s1) / (lam * 2 * gg).clamp_min(1e-30)).clamp(*_range(att, widen))
    set_gain, set_kl = s2 - t * s1, t * t * gg - 2 * t * gh + hh
    # scale a by s = 1 + d with s in SCALE_RANGE: gain = -d*s2, kl = d^2 hh
    d = (-s2 / (lam * 2 * hh).clamp_min(1e-30)).clamp(SCALE_RANGE[0] - 1, SCALE_RANGE[1] - 1)
    scale_gain, scale_kl = -d * s2, d * d * hh
    use_scale = scale_gain - lam * scale_kl > set_gain - lam * set_kl
    value, gain, kl = (torch.where(use_scale, a, b) for a, b in ((d + 1, t), (scale_gain, set_gain), (scale_kl, set_kl)))
    net = (gain - lam * kl).flatten()
    key = net
    if prior is not None and prior_weight:
        aligned = (torch.sign(value) * prior.double() * (1 if direction == "up" else -1)).clamp(0, 3)
        key = net * (1 + prior_weight * torch.where(use_scale, torch.zeros_like(aligned), aligned)).flatten()
    order = key.argsort(descending=True)[:int((net > 0).sum())]
    columns = (use_scale.flatten()[order], value.flatten()[order], gain.flatten()[order], kl.flatten()[order])
    return [Candidate(*divmod(flat, att.tox_g.shape[1]), "scale" if scale else "set", v, g, k)
            for flat, scale, v, g, k in zip(order.tolist(), *(c.tolist() for c in columns))]


def spec_from(candidates_: Sequence[Candidate], model, name: str = "steer", **meta) -> Spec:
    return Spec.build(name, [(c.layer, c.index, c.op, round(c.value, 4)) for c in candidates_], model=model, **meta)


# -- teacher-forced check ------------------------------------------------------------------------
@dataclass
class Check:
    """Effect of a spec on held-out samples, teacher-forced (no generation)."""

    toxic_drop: float  # mean drop of a toxic span's log-likelihood (nats; higher = less toxic)
    kl: float  # mean per-token KL(steered || unsteered) on continuation tokens (nats)
    toxic_mass: float  # mean steered/unsteered ratio of the toxic spans' probability
    ppl_rise: float  # estimated judge-perplexity rise: exp(CE(steered, unsteered) - H(unsteered)) - 1


class HeldOut:
    """Held-out samples with their unsteered log-probabilities cached, to check many specs cheaply.

    The toxic drop is measured on every toxic span (weighted like in the attribution), the KL on
    the continuation tokens of the model's own samples.
    """

    def __init__(self, model, samples: list[Sample], batch_size: int = 16):
        self.model, self.samples, self.batch_size = model, samples, batch_size
        self.base = [self._run(batch) for batch in _batches(samples, batch_size)]
        self.entropy = sum(float(-(base.exp() * base).sum()) for base, *_ in self.base)  # of the unsteered, summed

    @torch.no_grad()
    def _run(self, batch):
        _, input_ids, mask, cont, toxic, weight, own = batch
        device = next(self.model.parameters()).device
        input_ids = input_ids.to(device)
        logits = self.model(input_ids=input_ids, attention_mask=mask.to(device)).logits
        logp = torch.log_softmax(logits.float(), -1)
        target = logp[:, :-1].gather(-1, input_ids[:, 1:, None])[..., 0].cpu()
        row = torch.arange(len(own))[:, None].expand_as(cont)[cont]
        return (logp[(cont & own[:, None]).to(device)].cpu(),  # (own continuation tokens, vocab) for the KL
                target[cont[:, :-1]], toxic[cont], row, weight)

    def check(self, spec: Spec) -> Check:
        from steer.steering import steering

        kl_sum, ce_sum, tokens, drops, weights = 0.0, 0.0, 0, [], []
        for batch, (base, base_target, toxic, row, weight) in zip(_batches(self.samples, self.batch_size), self.base):
            with steering(self.model, spec):
                steered, steered_target, *_ = self._run(batch)
            q = steered.exp()
            kl_sum += float((q * (steered - base)).sum())
            ce_sum -= float((q * base).sum())  # what the unsteered judge pays for steered text, per token
            tokens += base.shape[0]
            diff = (steered_target - base_target).tolist()
            previous = (-1, False)
            for i, (is_toxic, r) in enumerate(zip(toxic.tolist(), row.tolist())):
                if is_toxic and previous == (r, True):  # same span: consecutive toxic tokens of one row
                    drops[-1] += diff[i]
                elif is_toxic:
                    drops.append(diff[i])
                    weights.append(float(weight[r]))
                previous = (r, is_toxic)
        total = max(1e-12, sum(weights))
        drop = -sum(w * d for w, d in zip(weights, drops)) / total
        ratio = sum(w * math.exp(d) for w, d in zip(weights, drops)) / total
        n = max(1, tokens)
        return Check(drop, kl_sum / n, ratio, math.exp((ce_sum - self.entropy) / n) - 1)


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

