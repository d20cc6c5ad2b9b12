"""Perplexity of each continuation given its prompt, under a judge LM (fluency check for steering).

Why not ``evaluate``'s ``perplexity`` metric: it reloads the model by hub id on every call (our
judge is usually the in-memory embedded model, converted from GGUF, with no hub id), and it
scores each text on its own, from the first token, so it cannot condition a continuation on its
prompt, which is what the RealToxicityPrompts protocol measures. So this is a small, batched
teacher-forced pass written directly against transformers.

Samples of one prompt share its forward pass: the prompts of a chunk run once (left padded,
with their KV cache), the cache is gathered to the rows of their continuations, and the
continuations (right padded) run on top. With 25 samples a prompt that makes the prompt part
25x cheaper; results equal a plain pass over prompt + continuation (checked in the tests).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def continuation_perplexity(model, tokenizer, prompts: Sequence[str], continuations: Sequence[str],
                            batch_size: int = 64, progress: bool = False) -> list[float]:
    """``exp`` of the mean negative log-likelihood of each continuation's tokens given its prompt.

    ``batch_size`` counts continuations per forward pass. A continuation with no tokens gets nan.
    """
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    out: list[float] = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="perplexity", disable=not progress, leave=False):
        chunk_p = list(prompts[start:start + batch_size])
        chunk_c = list(continuations[start:start + batch_size])
        unique = list(dict.fromkeys(chunk_p))
        row_of = torch.tensor([unique.index(p) for p in chunk_p], device=device)
        p_ids = [tokenizer(p).input_ids for p in unique]
        c_ids = [tokenizer(c, add_special_tokens=False).input_ids if c else [] for c in chunk_c]
        width, length = max(map(len, p_ids)), max(map(len, c_ids))
        if length == 0:
            out.extend([math.nan] * len(chunk_c))
            continue
        prompt = torch.full((len(unique), width), pad, dtype=torch.long)
        p_mask = torch.zeros_like(prompt)
        for i, ids in enumerate(p_ids):  # left padding: every prompt ends in the last column
            prompt[i, width - len(ids):] = torch.tensor(ids)
            p_mask[i, width - len(ids):] = 1
        cont = torch.full((len(chunk_c), length), pad, dtype=torch.long)
        c_mask = torch.zeros_like(cont)
        for i, ids in enumerate(c_ids):
            cont[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            c_mask[i, :len(ids)] = 1
        prompt, p_mask, cont, c_mask = (t.to(device) for t in (prompt, p_mask, cont, c_mask))

        first = model(input_ids=prompt, attention_mask=p_mask, position_ids=_positions(p_mask),
                      use_cache=True, logits_to_keep=1)
        cache = first.past_key_values
        cache.reorder_cache(row_of)  # one cache row per continuation
        mask = torch.cat([p_mask[row_of], c_mask], dim=1)
        rest = model(input_ids=cont, attention_mask=mask, position_ids=_positions(mask)[:, width:],
                     past_key_values=cache, use_cache=False)
        # the logits predicting continuation token j: the prompt's last position for j=0, else j-1
        logits = torch.cat([first.logits[row_of, -1:], rest.logits[:, :-1]], dim=1).float()
        nll = -torch.log_softmax(logits, -1).gather(-1, cont.unsqueeze(-1)).squeeze(-1)
        counts = c_mask.sum(-1)
        mean = (nll * c_mask).sum(-1) / counts.clamp(min=1)
        out.extend(math.exp(m) if n else math.nan for m, n in zip(mean.tolist(), counts.tolist()))
    return out
