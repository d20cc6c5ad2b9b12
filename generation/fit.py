"""Fit an exit model: layer maps, exit temperatures, then a self-supervised exit classifier.

0. The text: by default the model's own samples from a varied prompt mix
   (:mod:`generation.selfgen`), so the exit serves the text users generate; or any text.
1. One teacher-forced pass records, at the candidate layers (default: the upper half), each
   token's residual stream, the cheap features and the full model's top-1.
2. Maps ``layer -> last layer`` are fitted by least squares on two folds (alternate chunks).
3. Labels, self-supervised: does the *other* fold's map, read through the final norm and LM
   head, give the full model's top-1 here? (Out-of-fold, so the classifier learns how good the
   map is on unseen text, not how well it memorised this one.)
4. A small MLP over the features (:mod:`generation.probe`, one head per check layer) predicts
   the label. Its predictions on a held-back tenth of the fit tokens give the calibration curve
   (compute saved vs agreement over thresholds) stored with the model, and the default
   threshold: the one saving the most while meeting the targets (top-1 agreement, and optionally
   mean KL to the full model or a perplexity budget).
5. Exit temperatures (:mod:`generation.calibrate`): one per check layer, fitted out-of-fold on
   the tokens the classifier trained on, so the held-back curve measures them too.
6. The shipped maps are fitted on both folds.
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from steer import Adapter, model_name

from .collect import trace_chunks
from .corpus import token_chunks
from .exit_model import ExitModel, fingerprint
from .features import SCALARS, check_feature_set, direction, scalar_features
from steer.maps import LayerMaps, MapFitter
from .probe import train_probe
from .calibrate import TokenStats, fit_inverse_temperature, token_stats
from .selfgen import Sample, own_text
from .simulate import classifier_exits, distribution_outcome, oracle_exits, outcome, pick_threshold

THRESHOLDS = tuple(round(x, 3) for x in np.linspace(0.0, 1.0, 101))


@dataclass
class Records:
    """Per-token records at ``layers``: residual stream, scalar features, the full model's top-1."""

    layers: list[int]
    hidden: torch.Tensor  # (n_check, N, d) float16
    scalars: torch.Tensor  # (n_check, N, len(SCALARS)) float32
    top1: torch.Tensor  # (N,)
    fold: torch.Tensor  # (N,) chunk index % 2
    logprob_next: torch.Tensor  # (N,) full model's log-probability of the next token (nan at chunk ends)
    last: torch.Tensor | None = None  # (N, d) float16: the last layer's output (the full model's distribution)
    next_ids: torch.Tensor | None = None  # (N,) the next token (-1 at chunk ends)
    scored: torch.Tensor | None = None  # (N,) bool: positions a generating model decides (not the prompt's)

    def select(self, rows: torch.Tensor) -> "Records":
        """The records of ``rows`` (a bool mask or indices) only."""
        pick = (lambda t: None if t is None else t[:, rows])
        take = (lambda t: None if t is None else t[rows])
        return Records(self.layers, pick(self.hidden), pick(self.scalars), take(self.top1), take(self.fold),
                       take(self.logprob_next), take(self.last), take(self.next_ids), take(self.scored))

    def features(self, j: int, feature_set: str = "direction") -> np.ndarray:
        """Features of check layer ``j`` as the runtime computes them ([scalars,] unit direction)."""
        unit = direction(self.hidden[j].float())
        return (torch.cat([self.scalars[j], unit], -1) if feature_set == "ffn" else unit).cpu().numpy()


def default_layers(n_layers: int) -> list[int]:
    """Check layers: every third layer down from the second-to-last, to a quarter of the depth.

    Early checks rarely fire, but when they do they save most of the model: on the embedded
    model, dropping layers 8-13 from the checks cuts the compute saved at 95% agreement from
    11% to 8% (simulated). Checking every third layer instead of every layer loses nothing
    measurable there (11.2% vs 11.2%) and makes fitting three times cheaper."""
    if n_layers < 2:
        raise ValueError(f"early exit needs at least 2 layers; this model has {n_layers}")
    lowest = min(n_layers // 4, n_layers - 2)
    return list(range(n_layers - 2, lowest - 1, -3))[::-1]


@torch.no_grad()
def record(model, chunks: list[torch.Tensor], layers: list[int], fitters: list[MapFitter] | None = None,
           progress: bool = False, prompt_lens: list[int] | None = None) -> Records:
    """Trace ``chunks`` once; optionally feed fold ``i % 2`` of every chunk to ``fitters[i % 2]``.

    ``prompt_lens``: per chunk, how many leading positions are prompt (never decided in
    generation, so not ``scored``); default none."""
    hidden, scalars, top1, fold, logprob, last_h, next_ids, scored = [], [], [], [], [], [], [], []
    traces = trace_chunks(model, chunks, layers)
    if progress:
        from tqdm import tqdm

        traces = tqdm(traces, total=len(chunks), desc="teacher-forced pass", unit="chunk")
    for i, (trace, ids) in enumerate(zip(traces, chunks)):
        last = trace.hidden[-1]
        if fitters is not None:
            for layer in layers:
                fitters[i % 2].add(layer, trace.hidden[layer], last)
        hidden.append(torch.stack([trace.hidden[layer] for layer in layers]).half().cpu())
        previous = [trace.hidden[layer - 1] if layer else trace.embedded for layer in layers]
        scalars.append(torch.stack([scalar_features(prev, trace.hidden[layer], trace.coef[layer], trace.update[layer])
                                    for prev, layer in zip(previous, layers)]).cpu())
        top1.append(trace.logits.argmax(-1))
        fold.append(torch.full((ids.shape[1],), i % 2))
        lp = trace.logits.log_softmax(-1)[:-1].gather(1, ids[0, 1:].to(trace.logits.device)[:, None])[:, 0]
        logprob.append(torch.cat([lp.cpu(), torch.tensor([float("nan")])]))
        last_h.append(last.half().cpu())
        next_ids.append(torch.cat([ids[0, 1:].cpu(), torch.tensor([-1])]))
        start = prompt_lens[i] if prompt_lens is not None else 0
        scored.append(torch.arange(ids.shape[1]) >= start)
    return Records(list(layers), torch.cat(hidden, 1), torch.cat(scalars, 1), torch.cat(top1).cpu(),
                   torch.cat(fold), torch.cat(logprob), torch.cat(last_h), torch.cat(next_ids), torch.cat(scored))


def _mapped(records: Records, maps: LayerMaps | list[LayerMaps], layer: int, j: int, rows, device, dtype):
    h = records.hidden[j, rows].to(device, dtype)
    if isinstance(maps, list):  # tokens of fold f read through maps[1 - f] (out-of-fold)
        folds = records.fold[rows].to(device)
        return torch.where((folds == 0)[:, None], maps[1].apply(layer, h), maps[0].apply(layer, h))
    return maps.apply(layer, h)


@torch.no_grad()
def fit_temperatures(model, records: Records, maps: LayerMaps | list[LayerMaps], tokens: int = 2048) -> list[float]:
    """Per check layer, the inverse temperature of the mapped logits (:mod:`generation.calibrate`),
    fitted on up to ``tokens`` evenly spread tokens."""
    adapter = Adapter(model)
    device, dtype = adapter.unembed.weight.device, adapter.unembed.weight.dtype
    rows = torch.linspace(0, records.top1.shape[0] - 1, min(tokens, records.top1.shape[0])).long()
    full = adapter.readout(records.last[rows].to(device, dtype)).float().log_softmax(-1)
    return [fit_inverse_temperature(adapter.readout(_mapped(records, maps, layer, j, rows, device, dtype)).float(), full)
            for j, layer in enumerate(records.layers)]


@torch.no_grad()
def mapped_stats(model, records: Records, maps: LayerMaps | list[LayerMaps], betas: list[float] | None = None,
                 batch: int = 1024) -> TokenStats:
    """Per token and check layer: exiting there against the full model (:class:`TokenStats`).

    With two maps, tokens of fold ``f`` are read through ``maps[1 - f]`` (out-of-fold). ``betas``:
    inverse temperatures of the exit distributions (default 1)."""
    adapter = Adapter(model)
    device = adapter.unembed.weight.device
    dtype = adapter.unembed.weight.dtype
    n, k = records.top1.shape[0], len(records.layers)
    betas = betas or [1.0] * k
    out = [np.zeros((n, k), dtype=bool)] + [np.zeros((n, k), dtype=np.float32) for _ in range(3)]
    for start in range(0, n, batch):
        rows = slice(start, start + batch)
        full_top = records.top1[rows].to(device)
        full = None  # records without the last layer: only the top-1 is known
        if records.last is not None:
            full = adapter.readout(records.last[rows].to(device, dtype)).float().log_softmax(-1)
        nxt = records.next_ids[rows].to(device) if records.next_ids is not None else None
        for j, layer in enumerate(records.layers):
            logits = adapter.readout(_mapped(records, maps, layer, j, rows, device, dtype)).float()
            if full is None:
                best = logits.max(-1)
                out[0][rows, j] = (best.indices == full_top).cpu().numpy()
                out[1][rows, j] = (1.0 / (logits - best.values[:, None]).exp().sum(-1)).cpu().numpy()
                out[2][rows, j] = out[3][rows, j] = np.nan
                continue
            stats = token_stats(logits, full, betas[j], nxt if nxt is not None else torch.full_like(full_top, -1), full_top)
            for arr, value in zip(out, stats):
                arr[rows, j] = value
    return TokenStats(*out)


def mapped_top(model, records: Records, maps: LayerMaps | list[LayerMaps], batch: int = 1024):
    """``(correct, top_prob)``, each ``(N, n_check)``: mapped top-1 equals the final one; its probability."""
    stats = mapped_stats(model, records, maps, batch=batch)
    return stats.correct, stats.top_prob


def fit_exit_model(model, tokenizer, text: str | None = None, *, samples: list[Sample] | None = None,
                   layers: list[int] | None = None, chunk: int = 128, max_tokens: int | None = 131072,
                   min_tokens: int = 1024, ridge: float = 1e-3, hidden: int = 128, target_agreement: float | None = 0.95,
                   target_kl: float | None = None, target_ppl_rise: float | None = None, feature_set: str = "direction",
                   calibrate: bool = True, spec=None, batch: int = 32, seed: int = 0,
                   progress: bool = False) -> ExitModel:
    """Fit maps, exit temperatures and the exit classifier for ``model`` (fit on other text than you evaluate on).

    What it is fitted on: ``text`` (cut into ``chunk``-token pieces), or ``samples`` (token
    sequences with a prompt, :mod:`generation.selfgen`), or by default ``max_tokens`` of the
    model's *own* samples from a varied prompt mix (chat, narrative, news, code), which is
    what a generating model reads back. ``spec``: fit for the model steered by this spec (its
    samples, maps and labels all steered), so exited tokens carry the edits of the layers they skip.

    The default threshold is the one saving the most on held-back fit tokens while meeting every
    target given: top-1 agreement (``target_agreement``), mean KL to the full model in nats
    (``target_kl``), relative perplexity rise (``target_ppl_rise``, 0.08 = +8%).
    ``hidden``: units of the classifier's MLP (0: a linear probe). About 100k tokens are worth
    having: with 8k the MLP saves no more than a linear probe (:mod:`generation.probe`)."""
    check_feature_set(feature_set)
    adapter = Adapter(model)
    n_layers = adapter.n_layers
    layers = sorted(layers) if layers is not None else default_layers(n_layers)
    for layer in layers:
        adapter.check_layer(layer)
        if layer == n_layers - 1:
            raise ValueError(f"layer {layer} is the last layer: exiting after it saves nothing")
    with contextlib.ExitStack() as stack:
        if spec is not None:
            from steer import steering

            stack.enter_context(steering(model, spec))
        source = "text"
        if text is None and samples is None:
            source = "own samples"
            samples = own_text(model, tokenizer, max_tokens or 131072, batch=batch, seed=seed, progress=progress)
        if samples is not None:
            chunks, prompt_lens = [s.ids for s in samples], [s.prompt_len for s in samples]
            digest = hashlib.sha1(b"".join(c.numpy().tobytes() for c in chunks)).hexdigest()[:12]
        else:
            chunks, prompt_lens = token_chunks(tokenizer, text, chunk, max_tokens), None
            digest = hashlib.sha1(text.encode()).hexdigest()[:12]
        tokens = sum(c_.shape[1] for c_ in chunks)
        if tokens < min_tokens or len(chunks) < 2:
            raise ValueError(f"the text is too short to fit an exit model on: {tokens} tokens in whole chunks of "
                             f"{chunk}, need at least {max(min_tokens, 2 * chunk)} (give more text, e.g. a few pages)")
        d_model = adapter.unembed.weight.shape[1] if adapter.pre_unembed is None else adapter.pre_unembed.weight.shape[1]
        fitters = [MapFitter(d_model, ridge), MapFitter(d_model, ridge)]
        records = record(model, chunks, layers, fitters, progress=progress, prompt_lens=prompt_lens)
        records = records.select(records.scored)  # decisions are made on generated positions only
        fold_maps = [f.solve() for f in fitters]
        raw = mapped_stats(model, records, fold_maps)
        correct = raw.correct
        device = adapter.unembed.weight.device
        features = torch.stack([torch.from_numpy(records.features(j, feature_set)) for j in range(len(layers))], 1)
        probe, weight, bias, val, val_logodds = train_probe(features.to(device), torch.from_numpy(correct).to(device),
                                                            hidden=hidden)
        del features
        train = torch.from_numpy(np.setdiff1d(np.arange(correct.shape[0]), val))
        betas = fit_temperatures(model, records.select(train), fold_maps) if calibrate else [1.0] * len(layers)
        held = records.select(torch.from_numpy(val))
        cal = mapped_stats(model, held, fold_maps, betas)
    full_nll = -held.logprob_next.numpy().astype(float)
    curve = [dict(threshold=t, **distribution_outcome(classifier_exits(val_logodds, layers, n_layers, t), cal, full_nll,
                                                      layers, n_layers)) for t in THRESHOLDS]
    default = pick_threshold(curve, target_agreement, target_kl, target_ppl_rise)
    combined = MapFitter(d_model, ridge).merge(fitters[0]).merge(fitters[1])
    raw_val = raw.nll[val]
    info = {
        "tokens": tokens, "scored_tokens": int(correct.shape[0]), "source": source, "chunk": chunk, "ridge": ridge,
        "hidden": hidden, "features": (list(SCALARS) if feature_set == "ffn" else []) + ["direction"],
        "text_sha1": digest, "spec": None if spec is None else spec.name,
        "map_agreement": {str(layer): round(float(correct[:, j].mean()), 4) for j, layer in enumerate(layers)},
        "oracle_saved": round(outcome(oracle_exits(correct, layers, n_layers), correct, layers, n_layers)[0], 4),
        "target_agreement": target_agreement, "target_kl": target_kl, "target_ppl_rise": target_ppl_rise,
        # per check layer, mean NLL of the next token on held-back tokens: uncalibrated, calibrated
        "exit_nll": {str(layer): [round(float(np.nanmean(raw_val[:, j])), 4), round(float(np.nanmean(cal.nll[:, j])), 4)]
                     for j, layer in enumerate(layers)},
        "calibration": [[p["threshold"], round(p["saved"], 4), round(p["agreement"], 4), round(p["kl"], 4),
                         round(p["ppl_rise"], 4)] for p in curve],
    }
    return ExitModel(model_name(model), fingerprint(model), n_layers, d_model, combined.solve(), layers,
                     weight, bias, default, feature_set, info, probe, exit_scale=[round(b, 5) for b in betas])
