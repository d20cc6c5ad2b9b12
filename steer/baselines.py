"""The baselines FFN steering is measured against, each usable inside ``generate`` like SteeringProcessor.

* **Logit bias** (:class:`LogitBiasProcessor`): add ``b`` to the logits of the concept's tokens
  at every step; a plain ``LogitsProcessor``.
* **Activation addition** (:class:`ActAddProcessor`, :func:`activation_addition`): add
  ``alpha * v`` to the residual stream after decoder layer ``l`` at every position (prompt
  included), ``v`` the difference of mean activations between concept and anti-concept text
  (:func:`mean_difference`, CAA-style: Rimsky et al. 2024; Turner et al. 2023).
* **Prompting** (:func:`instructed`): the embedded model is instruction-tuned, so the
  instruction goes in a user turn and the prompt becomes the start of the assistant's reply
  (``continue_final_message``); ``generate`` then continues it. It changes the *input*, so it is
  a prompt transform, not a processor; the judge still scores the continuation after the plain prompt.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from transformers import LogitsProcessor

from .families import Adapter
from .hooks import hooks
from .models import position_ids
from .steering import HookedProcessor


class LogitBiasProcessor(LogitsProcessor):
    """Adds ``bias`` to the logits of ``token_ids`` (negative: suppress) at every generation step."""

    def __init__(self, token_ids: Sequence[int], bias: float):
        if not token_ids:
            raise ValueError("logit bias needs at least one token id")
        self.token_ids = torch.tensor(sorted({int(t) for t in token_ids}))
        self.bias = float(bias)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        scores[:, self.token_ids.to(scores.device)] += self.bias
        return scores


@contextmanager
def activation_addition(model: torch.nn.Module, layer: int, vector: torch.Tensor, alpha: float) -> Iterator[None]:
    """Add ``alpha * vector`` to the output of decoder layer ``layer`` (every position) inside the block."""
    adapter = Adapter(model)
    adapter.check_layer(layer)
    if vector.ndim != 1:
        raise ValueError(f"the steering vector must be 1-d, got shape {tuple(vector.shape)}")
    delta: dict[tuple, torch.Tensor] = {}

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        key = (hidden.device, hidden.dtype)
        if key not in delta:
            delta[key] = (alpha * vector.float()).to(hidden.device, hidden.dtype)
        hidden = hidden + delta[key]
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    with hooks((adapter.layers[layer], "post", hook)):
        yield


class ActAddProcessor(HookedProcessor):
    """Activation addition for one ``generate`` call: ``logits_processor=[ActAddProcessor(model, l, v, alpha)]``."""

    def __init__(self, model: torch.nn.Module, layer: int, vector: torch.Tensor, alpha: float):
        Adapter(model).check_layer(layer)
        self.model, self.layer, self.vector, self.alpha = model, layer, vector, float(alpha)
        self.active = False

    def hooks(self):
        return activation_addition(self.model, self.layer, self.vector, self.alpha)


@torch.no_grad()
def last_token_states(model, tokenizer, texts: Sequence[str], layers: Sequence[int],
                      batch_size: int = 32) -> dict[int, torch.Tensor]:
    """``{layer: (len(texts), d_model)}`` residual stream after each decoder layer at each text's last token."""
    adapter = Adapter(model)
    device = next(model.parameters()).device
    caught: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}

    def hook(layer):
        def grab(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            caught[layer].append(hidden[:, -1].float().cpu())  # left padded: the last column is every text's end
        return grab

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        with hooks(*[(adapter.layers[layer], "post", hook(layer)) for layer in layers]):
            for start in range(0, len(texts), batch_size):
                enc = tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True).to(device)
                model(**enc, position_ids=position_ids(enc["attention_mask"]), logits_to_keep=1)
    finally:
        tokenizer.padding_side = side
    return {layer: torch.cat(rows) for layer, rows in caught.items()}


def mean_difference(model, tokenizer, concept_texts: Sequence[str], anti_texts: Sequence[str],
                    layers: Sequence[int], batch_size: int = 32) -> dict[int, torch.Tensor]:
    """CAA-style steering vectors: mean last-token activation on concept text minus on anti-concept text, per layer."""
    if not concept_texts or not anti_texts:
        raise ValueError("need concept and anti-concept texts")
    plus = last_token_states(model, tokenizer, concept_texts, layers, batch_size)
    minus = last_token_states(model, tokenizer, anti_texts, layers, batch_size)
    return {layer: plus[layer].mean(0) - minus[layer].mean(0) for layer in layers}


def instructed(tokenizer, prompts: Sequence[str], instruction: str) -> list[str]:
    """Each prompt as the start of the assistant's reply to ``instruction`` (chat template, no new turn after it)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("prompting needs a tokenizer with a chat template (an instruction-tuned model)")
    return [tokenizer.apply_chat_template([{"role": "user", "content": instruction},
                                           {"role": "assistant", "content": prompt}],
                                          tokenize=False, continue_final_message=True)
            for prompt in prompts]
