"""First-order effect of every FFN coefficient on the target spans and on the model's own text,
from one backward pass per batch (gradients of activations only)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from steer.families import Adapter
from steer.hooks import hooks
from .samples import Sample, _batches, _token_logp


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
