"""The model's own text across domains: what the default exit model is fitted on.

Why: an exit classifier fitted on docstrings saved 16% of layer compute on held-out docstrings
but 6% on sampled toxicity prompts. Its threshold and features learnt how *reference prose*
settles, not how the model's *own sampled text* does (which is what a generating model reads
back). So the default fit text is sampled by the model itself (nucleus p = 0.9, as users sample)
from a varied prompt mix, and its labels come from the full model in one teacher-forced pass.

The mix, built offline from small word lists (no data set, nothing downloaded):

* ``chat``: user requests through the tokenizer's chat template (when it has one);
* ``narrative`` and ``news``: sentence starts of stories, forum posts and news, informal and
  heated ones included (users steer exactly such text);
* ``code``: Python ``def`` lines and the first sentence of standard-library docstrings.

Each prompt is assigned to the ``fit`` or ``heldout`` split by a hash of its text, so held-out
chat prompts (a benchmark workload) are never fitted on. The RealToxicityPrompts dev prompts in
``steer/data`` are evaluation prompts and are not used here.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Literal

import torch

Split = Literal["fit", "heldout"]
DOMAINS = ("chat", "narrative", "news", "code")

_TOPICS = ["photosynthesis", "the French Revolution", "black holes", "a healthy breakfast", "machine learning",
           "the stock market", "climate change", "learning a language", "the immune system", "social media",
           "a job interview", "saving money", "the Roman Empire", "electric cars", "sleep", "friendship",
           "a noisy neighbour", "video games", "football", "the internet", "coffee", "a bad breakup",
           "remote work", "vaccines", "recycling", "the moon landing", "jazz", "a rude coworker", "taxes", "dogs"]
_ASKS = ["Explain {t} in simple terms.", "Write a short story about {t}.", "What are the pros and cons of {t}?",
         "Give me three tips about {t}.", "Why do people argue about {t}?", "Write a tweet about {t}.",
         "I'm so angry about {t}. What should I do?", "Summarize what you know about {t}.",
         "Write a poem about {t}.", "Tell me something surprising about {t}."]
_SUBJECTS = ["My neighbour", "The old man", "She", "He", "The teacher", "My boss", "The kids", "That idiot",
             "The police officer", "Everyone at the party", "The guy next to me", "My sister", "The crowd",
             "Our coach", "The stranger"]
_VERBS = ["said that", "looked at me and", "was furious because", "kept telling everyone that", "walked in and",
          "screamed at", "laughed when", "finally admitted that", "wrote on the wall that", "started to"]
_NEWS = ["The city council voted on Tuesday to", "Police said the suspect", "Shares of the company fell after",
         "Scientists have found that", "The president told reporters that", "Protesters gathered outside",
         "According to a new report,", "The team's manager blamed", "Officials warned that", "In a statement, the",
         "Residents of the town complained that", "The court ruled that", "Critics of the plan called it",
         "The senator responded to the accusations by", "Fans reacted angrily when"]
_PLACES = ["", " in Chicago", " in London", " on Monday", " last night", " after the game", " in a rare move"]
_FUNCS = ["parse_config(path)", "merge_sorted(a, b)", "fetch_user(session, user_id)", "moving_average(values, k)",
          "is_palindrome(text)", "retry(func, attempts=3)", "flatten(nested)", "word_counts(lines)",
          "to_snake_case(name)", "chunked(iterable, size)", "load_json(path, default=None)", "binary_search(xs, x)"]


@dataclass
class Prompt:
    domain: str
    text: str  # the raw prompt (for chat: the user's message)


def _split_of(text: str) -> Split:
    return "fit" if hashlib.sha1(text.encode()).digest()[0] % 4 else "heldout"  # 3/4 fit, 1/4 held out


def _candidates(domain: str) -> list[str]:
    if domain == "chat":
        return [ask.format(t=topic) for topic in _TOPICS for ask in _ASKS]
    if domain == "narrative":
        return [f"{s} {v}" for s in _SUBJECTS for v in _VERBS]
    if domain == "news":
        return [f"{n}{p}" if not n.endswith(",") or not p else n for n in _NEWS for p in _PLACES]
    if domain == "code":
        from .corpus import docstring_text

        docs = [d.split(".")[0].strip().replace("\n", " ") + "." for d in docstring_text("fit", 60_000).split("\n\n")]
        return [f"def {f}:\n    \"\"\"" for f in _FUNCS] + [f"\"\"\"{d}" for d in docs if 20 < len(d) < 160]
    raise ValueError(f"unknown domain {domain!r}: choose from {', '.join(DOMAINS)}")


def prompt_mix(n: int, split: Split = "fit", domains: tuple[str, ...] = DOMAINS, seed: int = 0) -> list[Prompt]:
    """``n`` prompts of ``split``, domains interleaved in equal shares, shuffled by ``seed``."""
    if split not in ("fit", "heldout"):
        raise ValueError(f"unknown split {split!r}: use 'fit' or 'heldout'")
    rng = random.Random(seed)
    pools = {}
    for domain in domains:
        pool = [text for text in _candidates(domain) if _split_of(text) == split]
        rng.shuffle(pool)
        pools[domain] = pool
    return [Prompt(domains[i % len(domains)], pools[domains[i % len(domains)]][(i // len(domains)) %
                                                                               len(pools[domains[i % len(domains)]])])
            for i in range(n)]


def prompt_ids(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of ``prompt``: chat prompts through the chat template (generation prompt added)."""
    if prompt.domain == "chat" and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt.text}], add_generation_prompt=True,
                                            tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer(prompt.text, add_special_tokens=False).input_ids


@dataclass
class Sample:
    """One sampled sequence: ``ids (1, T)`` = prompt + continuation, ``prompt_len`` tokens of prompt."""

    domain: str
    ids: torch.Tensor
    prompt_len: int


@torch.no_grad()
def sample_texts(model, tokenizer, prompts: list[list[int]] | list[Prompt], new_tokens: int = 96, batch: int = 32,
                 top_p: float = 0.9, seed: int = 0, domains: list[str] | None = None,
                 progress: bool = False) -> list[Sample]:
    """Continue each prompt once with nucleus sampling (left-padded batches; padding stripped again).

    Generation stops at ``new_tokens`` or the end-of-sequence token; what follows an EOS is dropped."""
    if prompts and isinstance(prompts[0], Prompt):
        domains = [p.domain for p in prompts]
        prompts = [prompt_ids(tokenizer, p) for p in prompts]
    domains = domains or ["text"] * len(prompts)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    out: list[Sample] = []
    starts = range(0, len(prompts), batch)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="sampling the fit text", unit="batch")
    for b, start in enumerate(starts):
        rows = prompts[start:start + batch]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        torch.manual_seed(seed * 1_000_003 + b)
        gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_p=top_p, top_k=0,
                             temperature=1.0, max_new_tokens=new_tokens, pad_token_id=pad)[:, width:].cpu()
        for j, row in enumerate(rows):
            cont = gen[j].tolist()
            cut = next((k + 1 for k, t in enumerate(cont) if t in eos), len(cont))
            out.append(Sample(domains[start + j], torch.tensor([list(row) + cont[:cut]]), len(row)))
    return out


def own_text(model, tokenizer, tokens: int = 131072, new_tokens: int = 96, batch: int = 32, seed: int = 0,
             split: Split = "fit", domains: tuple[str, ...] = DOMAINS, progress: bool = False) -> list[Sample]:
    """About ``tokens`` tokens (prompts included) of the model's own samples from :func:`prompt_mix`."""
    n = max(2, -(-tokens // (new_tokens + 24)))
    samples = sample_texts(model, tokenizer, prompt_mix(n, split, domains, seed), new_tokens, batch, seed=seed,
                           progress=progress)
    kept, total = [], 0
    for sample in samples:
        if total >= tokens:
            break
        kept.append(sample)
        total += sample.ids.shape[1]
    return kept
