"""Fit an exit model on any text: layer maps, then a self-supervised exit classifier.

1. One teacher-forced pass records, at the candidate layers (default: the upper half), each
   token's residual stream, the cheap features and the full model's top-1.
2. Maps ``layer -> last layer`` are fitted by least squares on two folds (alternate chunks).
3. Labels, self-supervised: does the *other* fold's map, read through the final norm and LM
   head, give the full model's top-1 here? (Out-of-fold, so the classifier learns how good the
   map is on unseen text, not how well it memorised this one.)
4. A small MLP over the features (:mod:`generation.probe`, one head per check layer) predicts
   the label. Its predictions on a held-back tenth of the fit tokens give the calibration curve
   (compute saved vs agreement over thresholds) stored with the model, and the default
   threshold: the lowest whose agreement there reaches ``target_agreement``.
5. The shipped maps are fitted on both folds.
"""
from __future__ import annotations

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
from .simulate import classifier_exits, oracle_exits, outcome

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
           progress: bool = False) -> Records:
    """Trace ``chunks`` once; optionally feed fold ``i % 2`` of every chunk to ``fitters[i % 2]``."""
    hidden, scalars, top1, fold, logprob = [], [], [], [], []
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
    return Records(list(layers), torch.cat(hidden, 1), torch.cat(scalars, 1), torch.cat(top1).cpu(),
                   torch.cat(fold), torch.cat(logprob))


@torch.no_grad()
def mapped_top(model, records: Records, maps: LayerMaps | list[LayerMaps], batch: int = 1024):
    """``(correct, top_prob)``, each ``(N, n_check)``: mapped top-1 equals the final one; its probability.

    With two maps, tokens of fold ``f`` are read through ``maps[1 - f]`` (out-of-fold).
    """
    adapter = Adapter(model)
    device = adapter.unembed.weight.device
    dtype = adapter.unembed.weight.dtype
    n = records.top1.shape[0]
    correct = np.zeros((n, len(records.layers)), dtype=bool)
    top_prob = np.zeros((n, len(records.layers)), dtype=np.float32)
    for j, layer in enumerate(records.layers):
        for start in range(0, n, batch):
            rows = slice(start, start + batch)
            h = records.hidden[j, rows].to(device, dtype)
            if isinstance(maps, list):
                folds = records.fold[rows].to(device)
                mapped = torch.where((folds == 0)[:, None], maps[1].apply(layer, h), maps[0].apply(layer, h))
            else:
                mapped = maps.apply(layer, h)
            logits = adapter.readout(mapped).float()
            best = logits.max(-1)
            correct[rows, j] = (best.indices.cpu() == records.top1[rows]).numpy()
            top_prob[rows, j] = (1.0 / (logits - best.values[:, None]).exp().sum(-1)).cpu().numpy()
    return correct, top_prob


def fit_exit_model(model, tokenizer, text: str, *, layers: list[int] | None = None, chunk: int = 128,
                   max_tokens: int | None = 131072, min_tokens: int = 1024, ridge: float = 1e-3, hidden: int = 128,
                   target_agreement: float = 0.95, feature_set: str = "direction", progress: bool = False) -> ExitModel:
    """Fit maps and the exit classifier for ``model`` on ``text`` (fit on other text than you evaluate on).

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
    chunks = token_chunks(tokenizer, text, chunk, max_tokens)
    tokens = sum(c_.shape[1] for c_ in chunks)
    if tokens < min_tokens or len(chunks) < 2:
        raise ValueError(f"the text is too short to fit an exit model on: {tokens} tokens in whole chunks of "
                         f"{chunk}, need at least {max(min_tokens, 2 * chunk)} (give more text, e.g. a few pages)")
    d_model = adapter.unembed.weight.shape[1] if adapter.pre_unembed is None else adapter.pre_unembed.weight.shape[1]
    fitters = [MapFitter(d_model, ridge), MapFitter(d_model, ridge)]
    records = record(model, chunks, layers, fitters, progress=progress)
    fold_maps = [f.solve() for f in fitters]
    correct, _ = mapped_top(model, records, fold_maps)
    device = adapter.unembed.weight.device
    features = torch.stack([torch.from_numpy(records.features(j, feature_set)) for j in range(len(layers))], 1)
    probe, weight, bias, val, val_logodds = train_probe(features.to(device), torch.from_numpy(correct).to(device),
                                                        hidden=hidden)
    del features
    calibration = [(t, *outcome(classifier_exits(val_logodds, layers, n_layers, t), correct[val], layers, n_layers))
                   for t in THRESHOLDS]
    reaching = [t for t, _, agree in calibration if agree >= target_agreement]
    default = min(reaching) if reaching else 1.0
    combined = MapFitter(d_model, ridge).merge(fitters[0]).merge(fitters[1])
    info = {
        "tokens": tokens, "chunk": chunk, "ridge": ridge, "hidden": hidden, "features": (list(SCALARS) if feature_set == "ffn" else []) + ["direction"],
        "text_sha1": hashlib.sha1(text.encode()).hexdigest()[:12],
        "map_agreement": {str(layer): round(float(correct[:, j].mean()), 4) for j, layer in enumerate(layers)},
        "oracle_saved": round(outcome(oracle_exits(correct, layers, n_layers), correct, layers, n_layers)[0], 4),
        "target_agreement": target_agreement,
        "calibration": [[t, round(s, 4), round(a, 4)] for t, s, a in calibration],
    }
    return ExitModel(model_name(model), fingerprint(model), n_layers, d_model, combined.solve(), layers,
                     weight, bias, default, feature_set, info, probe)
