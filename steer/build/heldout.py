"""The teacher-forced check on held-out selection samples: target change, KL, estimated perplexity rise."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from steer.spec import Spec
from .samples import Sample, _batches


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
