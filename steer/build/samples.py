"""The model's own samples and the spans a builder targets in them (written or forced words)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from steer.models import position_ids



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
