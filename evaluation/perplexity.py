"""Perplexity of each continuation given its prompt, under a judge LM (fluency check for steering).

Why not ``evaluate``'s ``perplexity`` metric: it reloads the model by hub id on every call (our
judge is usually the in-memory embedded model, converted from GGUF, with no hub id), and it
scores each text on its own, from the first token, so it cannot condition a continuation on its
prompt, which is what the RealToxicityPrompts protocol measures. So this is a small, batched
teacher-forced pass written directly against transformers.

When the judge is the generating model and nothing edits its forward pass, ``LogProbRecorder``
reads the log-probabilities off ``generate`` itself (no second pass). Otherwise samples of one
prompt share its forward pass: the prompts of a chunk run once (left padded,
with their KV cache), the cache is gathered to the rows of their continuations, and the
continuations (right padded) run on top. With 25 samples a prompt that makes the prompt part
25x cheaper; results equal a plain pass over prompt + continuation (checked in the tests).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from steer.compat import cache_of, with_cache
from steer.hooks import hooks
from steer.models import position_ids


@torch.no_grad()
def token_perplexity(model, prompt_ids: Sequence[Sequence[int]], continuation_ids: Sequence[Sequence[int]],
                     pad_id: int = 0, batch_size: int = 64, progress: bool = False) -> list[float]:
    """Like :func:`continuation_perplexity`, on token ids (no re-tokenization round trip)."""
    if len(prompt_ids) != len(continuation_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(continuation_ids)} continuations")
    device = next(model.parameters()).device
    out: list[float] = []
    for start in tqdm(range(0, len(prompt_ids), batch_size), desc="perplexity", disable=not progress, leave=False):
        chunk_p = [tuple(p) for p in prompt_ids[start:start + batch_size]]
        c_ids = [list(c) for c in continuation_ids[start:start + batch_size]]
        unique = list(dict.fromkeys(chunk_p))
        row_of = torch.tensor([unique.index(p) for p in chunk_p], device=device)
        width, length = max(map(len, unique)), max(map(len, c_ids))
        if length == 0:
            out.extend([math.nan] * len(c_ids))
            continue
        if min(map(len, unique)) == 0:
            raise ValueError("every prompt needs at least one token to condition on")
        prompt = torch.full((len(unique), width), pad_id, dtype=torch.long)
        p_mask = torch.zeros_like(prompt)
        for i, ids in enumerate(unique):  # left padding: every prompt ends in the last column
            prompt[i, width - len(ids):] = torch.tensor(ids)
            p_mask[i, width - len(ids):] = 1
        cont = torch.full((len(c_ids), length), pad_id, dtype=torch.long)
        c_mask = torch.zeros_like(cont)
        for i, ids in enumerate(c_ids):
            cont[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            c_mask[i, :len(ids)] = 1
        prompt, p_mask, cont, c_mask = (t.to(device) for t in (prompt, p_mask, cont, c_mask))

        first = model(input_ids=prompt, attention_mask=p_mask, position_ids=position_ids(p_mask),
                      use_cache=True, logits_to_keep=1)
        cache = cache_of(first)
        cache.reorder_cache(row_of)  # one cache row per continuation
        mask = torch.cat([p_mask[row_of], c_mask], dim=1)
        rest = model(**with_cache(cache, input_ids=cont, attention_mask=mask,
                                  position_ids=position_ids(mask)[:, width:], use_cache=False))
        # the logits predicting continuation token j: the prompt's last position for j=0, else j-1
        logits = torch.cat([first.logits[row_of, -1:], rest.logits[:, :-1]], dim=1).float()
        logp = torch.log_softmax(logits, -1).gather(-1, cont.unsqueeze(-1)).squeeze(-1)
        out.extend(_from_logprobs(logp, c_mask.sum(-1)))
    return out


def continuation_perplexity(model, tokenizer, prompts: Sequence[str], continuations: Sequence[str],
                            batch_size: int = 64, progress: bool = False) -> list[float]:
    """``exp`` of the mean negative log-likelihood of each continuation's tokens given its prompt.

    ``batch_size`` counts continuations per forward pass. A continuation with no tokens gets nan.
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    # samples of one prompt repeat it: tokenize each distinct prompt once
    ids_of = {p: tokenizer(p).input_ids for p in dict.fromkeys(prompts)}
    prompt_ids = [ids_of[p] for p in prompts]
    continuation_ids = [tokenizer(c, add_special_tokens=False).input_ids if c else [] for c in continuations]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return token_perplexity(model, prompt_ids, continuation_ids, pad, batch_size, progress)


def _from_logprobs(logp: torch.Tensor, lengths: torch.Tensor) -> list[float]:
    """Per row: exp(-mean of the first ``length`` log-probabilities); nan for empty rows."""
    mask = torch.arange(logp.shape[1], device=logp.device) < lengths.to(logp.device).unsqueeze(1)
    mean = (logp * mask).sum(-1) / lengths.clamp(min=1).to(logp.device)
    return [math.exp(-m) if n else math.nan for m, n in zip(mean.tolist(), lengths.tolist())]


class LogProbRecorder:
    """Log-probabilities an unmodified model gives the tokens it samples, caught during ``generate``.

    When the judge is the generating model itself, unsteered, the judge's teacher-forced pass
    would recompute exactly the logits that ``generate`` already computed; two hooks catch them
    instead (a forward hook keeps the last position's log-softmax, a pre-hook gathers it at the
    token fed back next step), holding one (batch, vocab) tensor, not every step's logits.
    """

    def __init__(self, model):
        self.model, self.steps, self._last = model, [], None

    def __enter__(self) -> "LogProbRecorder":
        self.steps, self._last = [], None
        self._hooks = hooks((self.model, "pre_kwargs", self._on_input), (self.model, "post", self._on_output))
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def _on_input(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if self._last is not None and ids is not None:
            self.steps.append(self._last.gather(1, ids[:, -1:]).squeeze(1))

    def _on_output(self, module, args, output) -> None:
        self._last = torch.log_softmax(output.logits[:, -1].float(), -1)

    def perplexity(self, new_ids: torch.Tensor, lengths: Sequence[int]) -> list[float]:
        """Perplexity of each row's first ``lengths[i]`` generated tokens (``new_ids``: generated part)."""
        steps = self.steps + [self._last.gather(1, new_ids[:, -1:]).squeeze(1)]
        logp = torch.stack(steps[-new_ids.shape[1]:], 1)
        return _from_logprobs(logp, torch.tensor(list(lengths)))
