"""Toxicity scorers: one small interface (``.name``, batched ``.score(texts) -> [0, 1]``).

* ``detoxify[:original|unbiased|multilingual|original-small|unbiased-small|PATH.ckpt]`` is the
  scorer of record (Jigsaw-trained classifiers, the ones RealToxicityPrompts-style papers report).
  Its weights come from GitHub releases (cached by ``torch.hub``); offline, pass a local checkpoint
  and a folder holding the HF config and tokenizer of its architecture (``config_dir``).
* ``profanity-check`` (alt-profanity-check's trained linear SVM) is the offline default: tiny,
  fast, always installed, cruder than Detoxify.
* ``evaluate[:MODEL]`` is HF ``evaluate``'s ``toxicity`` measurement (a RoBERTa hate-speech
  classifier); it needs the hub for its script and model.

``auto`` picks Detoxify when its weights are on this machine, else profanity-check. Every
scorer's ``.name`` says what made the numbers; reports print it next to them.
"""
from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path
from typing import Protocol

import torch

from steer.errors import SteerError

DETOXIFY_VARIANTS = ("original", "unbiased", "multilingual", "original-small", "unbiased-small")
CHECKPOINT_ENV, CONFIG_ENV = "STEER_DETOXIFY_CHECKPOINT", "STEER_DETOXIFY_CONFIG"
SCORERS = "auto, profanity-check, detoxify[:VARIANT|:PATH.ckpt], evaluate[:MODEL]"
PROFANITY_CHECK = ("profanity-check", "alt-profanity-check", "profanity_check")


class ScorerUnavailable(SteerError):
    """A scorer whose weights or code cannot be had here; the message says what to do."""


class ToxicityScorer(Protocol):
    name: str

    def score(self, texts: list[str]) -> list[float]: ...


class ProfanityCheckScorer:
    """alt-profanity-check's calibrated linear SVM on word n-grams (ships with the package)."""

    def __init__(self) -> None:
        import profanity_check

        self._predict = profanity_check.predict_prob
        self.name = f"alt-profanity-check {importlib.metadata.version('alt-profanity-check')}"

    def score(self, texts: list[str]) -> list[float]:
        return [float(p) for p in self._predict(list(texts))] if texts else []


class DetoxifyScorer:
    """Detoxify's ``toxicity`` head, loaded through Detoxify's own checkpoint loader.

    ``source`` is a variant name (weights fetched or read from the torch.hub cache) or a local
    ``.ckpt`` path. Detoxify reads the config named by the checkpoint's
    ``config.arch.args.model_type`` (e.g. ``bert-base-uncased``) from the hub even when given a
    local config folder, so with ``config_dir`` we point ``model_type`` at that folder: the only
    way its loader works offline.
    """

    def __init__(self, source: str = "original", config_dir: str | os.PathLike | None = None,
                 device: str | torch.device | None = None, batch_size: int = 64):
        from detoxify.detoxify import MODEL_URLS, get_model_and_tokenizer

        self.device = torch.device(device or "cpu")
        self.batch_size = batch_size
        loaded, label = self._load_checkpoint(source, MODEL_URLS)
        if not isinstance(loaded, dict) or "config" not in loaded or "state_dict" not in loaded:
            raise ScorerUnavailable(f"{source} is not a Detoxify checkpoint: it needs 'config' and 'state_dict'")
        args = dict(loaded["config"]["arch"]["args"])
        if config_dir is not None:
            if not Path(config_dir, "config.json").exists():
                raise ScorerUnavailable(f"Detoxify config folder {config_dir} has no config.json")
            args["model_type"] = str(config_dir)
        try:
            self.model, self.tokenizer = get_model_and_tokenizer(
                **args, state_dict=loaded["state_dict"],
                huggingface_config_path=str(config_dir) if config_dir is not None else None)
        except (OSError, ValueError) as err:
            raise ScorerUnavailable(
                f"Detoxify needs the HF config and tokenizer of {args.get('model_type')!r}, which cannot be "
                f"loaded here ({str(err).splitlines()[0]}). Save them to a folder (AutoConfig/AutoTokenizer "
                f".save_pretrained) and pass it as --detoxify-config DIR (or ${CONFIG_ENV})."
            ) from None
        renames = {"toxic": "toxicity", "identity_hate": "identity_attack", "severe_toxic": "severe_toxicity"}
        classes = [renames.get(c, c) for c in loaded["config"]["dataset"]["args"]["classes"]]
        self.column = classes.index("toxicity")
        self.model.to(self.device).eval()
        self.name = f"detoxify:{label}"

    @staticmethod
    def _load_checkpoint(source: str, urls: dict[str, str]) -> tuple[dict, str]:
        path = Path(source)
        if path.is_file():
            return torch.load(path, map_location="cpu", weights_only=False), path.name
        if source not in urls:
            raise ScorerUnavailable(
                f"Detoxify checkpoint {source!r} is neither a file nor a variant ({', '.join(DETOXIFY_VARIANTS)})")
        try:
            return torch.hub.load_state_dict_from_url(urls[source], map_location="cpu", weights_only=False), source
        except Exception as err:  # offline: URLError, socket errors, HTTP errors...
            raise ScorerUnavailable(
                f"Detoxify weights {source!r} cannot be fetched ({type(err).__name__}: {err}). Download "
                f"{urls[source]} on a machine with internet, then pass --scorer detoxify:/path/to/file.ckpt "
                f"--detoxify-config DIR (DIR: the HF config + tokenizer of its base model), or set "
                f"${CHECKPOINT_ENV} and ${CONFIG_ENV}; or use --scorer profanity-check."
            ) from None

    @torch.no_grad()
    def score(self, texts: list[str]) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = list(texts[start:start + self.batch_size])
            inputs = self.tokenizer(batch, return_tensors="pt", truncation=True, padding=True).to(self.device)
            logits = self.model(**inputs)[0]
            scores.extend(torch.sigmoid(logits[:, self.column].float()).tolist())
        return scores


class EvaluateToxicityScorer:
    """HF ``evaluate``'s ``toxicity`` measurement (needs the hub for its script and model)."""

    def __init__(self, model_name: str | None = None):
        import evaluate

        try:
            self.measurement = evaluate.load("toxicity", model_name, module_type="measurement")
        except Exception as err:
            raise ScorerUnavailable(
                "HF evaluate's toxicity measurement needs its script and model "
                f"({model_name or 'facebook/roberta-hate-speech-dynabench-r4-target'}) from the hub, which cannot "
                f"be loaded here ({type(err).__name__}); use --scorer detoxify or profanity-check"
            ) from None
        self.name = f"evaluate-toxicity:{model_name or 'roberta-hate-speech-dynabench-r4'}"

    def score(self, texts: list[str]) -> list[float]:
        return [float(x) for x in self.measurement.compute(predictions=list(texts))["toxicity"]] if texts else []


def _detoxify_on_disk() -> tuple[str, str | None] | None:
    """(checkpoint, config_dir) when Detoxify can run without the network, else None."""
    checkpoint = os.environ.get(CHECKPOINT_ENV)
    if checkpoint:
        return checkpoint, os.environ.get(CONFIG_ENV)
    from detoxify.detoxify import MODEL_URLS

    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(MODEL_URLS["original"]).name
    if not cached.exists():
        return None
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained("bert-base-uncased", local_files_only=True)
    except OSError:
        return None
    return "original", None


def check_scorer_name(name: str) -> str:
    """``name`` if it names a scorer (whose weights may still be missing here), else a SteerError
    listing the scorers: checked when a run is configured, not when its first batch is scored."""
    if not isinstance(name, str) or not name.strip():
        raise SteerError(f"scorer must be a name, got {name!r}: use one of {SCORERS}")
    kind, colon, arg = name.partition(":")
    kind = kind.strip().lower()
    if kind not in ("auto", "detoxify", "evaluate", *PROFANITY_CHECK):
        raise SteerError(f"unknown scorer {name!r}: use one of {SCORERS}")
    if colon and kind not in ("detoxify", "evaluate"):
        raise SteerError(f"scorer {kind!r} takes no ':' argument, got {name!r}")
    if kind == "detoxify" and arg and arg not in DETOXIFY_VARIANTS and not Path(arg).is_file():
        raise ScorerUnavailable(f"Detoxify checkpoint {arg!r} is neither a file nor a variant "
                                f"({', '.join(DETOXIFY_VARIANTS)})")
    return name


def get_toxicity_scorer(name: str = "auto", device: str | torch.device | None = None,
                        config_dir: str | os.PathLike | None = None, batch_size: int = 64) -> ToxicityScorer:
    """A scorer by name: ``auto``, ``profanity-check``, ``detoxify[:VARIANT|:PATH]``, ``evaluate[:MODEL]``."""
    kind, _, arg = check_scorer_name(name or "auto").partition(":")
    kind = kind.strip().lower()
    if kind == "auto":
        found = _detoxify_on_disk()
        if found is None:
            return ProfanityCheckScorer()
        return DetoxifyScorer(found[0], config_dir or found[1], device, batch_size)
    if kind in PROFANITY_CHECK:
        return ProfanityCheckScorer()
    if kind == "detoxify":
        return DetoxifyScorer(arg or "original", config_dir or os.environ.get(CONFIG_ENV), device, batch_size)
    return EvaluateToxicityScorer(arg or None)
