"""What the demo does, without any Gradio: build interventions, generate side by side, explore vectors.

Everything here composes library calls (``steer.rank_vectors``, ``steer.steering``,
``steer.presets.preset_for``, ``evaluation.toxicity``, ``generation.early_exit``); the Gradio
layer in :mod:`ui.app` only wires widgets to these methods, so the same behaviour is testable
(and scriptable) without a browser.

Steering hooks are attached to the shared model for the duration of one ``generate``, so two
requests running at once would each see the other's hooks (and reseed the other's sampler).
Every use of the model therefore holds :attr:`SteerDemo.lock`: each request gets exactly the
continuation it would get alone with the same seed.
"""
from __future__ import annotations

import copy
import dataclasses
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from steer.compat import compile_config
from steer.slots import install_slots
from steer import Adapter, Concept, ConceptScorer, Spec, SpecError, VectorName, VocabIndex, model_name, steering
from steer.errors import SteerError
from steer.inputs import check_prompt, encode_prompt, integer, number
from steer.models import cache_dir
from steer.vocab import project

PRESET = "detox preset"
POSITIVE = "positive"
NEGATIVE = "negative"
LEXICON = "toxicity lexicon"
WORDS = "my own words"
CONCEPTS = (PRESET, POSITIVE, NEGATIVE, LEXICON, WORDS)
SUPPRESS, PROMOTE = "suppress", "promote"  # ranking only: the top vectors by vocabulary projection
RAISE, LOWER = "raise (builder)", "lower (builder)"  # steer.build: chosen by measured effect
MODES = (RAISE, LOWER, PROMOTE, SUPPRESS)
# the builder at demo size: about as long as fitting the exit model on 2 CPU cores (then cached)
DEMO_BUILD = dict(prompt_limit=16, samples=2, counts=(5, 10, 20), lams=(4.0, 16.0), forced_per_prompt=3, mid_sample=1)
BY_SCORE, BY_INDEX = "z-score ranking", "top-30 tokens (index)"
COLUMNS = ["vector", "op", "value", "top tokens"]


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask for (a shared CPU model serves every user)."""

    prompt_chars: int = 2000
    prompt_tokens: int = 512
    max_new_tokens: int = 200
    words_chars: int = 500
    vectors: int = 500  # value vectors taken from a concept or shown by a search
    edits: int = 5000  # edits in one intervention (uploaded or typed)


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.9
    max_new_tokens: int = 30
    seed: int = 0


@dataclass(frozen=True)
class Continuation:
    text: str
    tokens: int
    seconds: float
    layers_saved: float | None = None  # share of layer compute early exit skipped (None: exit off)
    toxicity: float | None = None
    scorer: str = ""  # the scorer's name, or why there is no score

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def apply_strength(spec: Spec, strength: float) -> Spec:
    """:meth:`Spec.scaled`, the one meaning of strength: 0 = no change, 1 = as built, 2 = twice the change."""
    return spec.scaled(number(strength, "strength"))


class SteerDemo:
    """One model shared by every user of the demo; see the module docstring for the lock."""

    def __init__(self, model, tokenizer, *, scorer: str = "auto", exit_model=None,
                 exit_threshold: float | None = None, limits: Limits = Limits(), compile: bool = False):
        from steer.evaluation.toxicity import check_scorer_name

        check_scorer_name(scorer)  # a typo is refused at start, not shown as "no scores" in the page
        if exit_threshold is not None:
            exit_threshold = number(exit_threshold, "exit threshold", low=0.0, high=1.0)
        self.model, self.tokenizer, self.limits = model, tokenizer, limits
        self.compile = compile  # static cache + compiled decode step (edits inside it); early exit stays eager
        if compile:
            install_slots(model)
        self.adapter = Adapter(model)
        self.name = model_name(model)
        self.lock = threading.Lock()  # held around every forward pass of the model
        self._side_lock = threading.Lock()  # lazy loading of scorer, index, exit model
        self._scorer_name, self._scorer, self._scorer_error = scorer, None, None
        self._exit_source, self._exit_model, self.exit_threshold = exit_model, None, exit_threshold
        self._index: VocabIndex | None = None
        self._lexicon: Concept | None = None
        self._concepts: ConceptScorer | None = None  # built on the first ranking, then each concept is cheap
        self.preset, self.preset_error = self._load_preset()
        self.exit_error = self._check_exit()
        if self.exit_error is None and (exit_model is not None or self._exit_cache().exists()):
            try:  # a given or previously fitted exit model loads in a moment: have it (and its threshold) now
                self.exit_model().check_model(model)
            except (ValueError, OSError) as err:
                if exit_model is not None:  # named by the user: a missing or foreign one stops the start
                    raise
                self.exit_error = str(err)

    # -- what is available ------------------------------------------------------------------
    def _load_preset(self) -> tuple[Spec | None, str | None]:
        try:
            from steer.presets import preset_for
        except ImportError as err:
            return None, f"steer.build is not available ({err})"
        try:
            return preset_for(self.model), None
        except (ValueError, OSError) as err:
            return None, str(err)

    @property
    def default_concept(self) -> str:
        return PRESET if self.preset is not None else LEXICON

    @property
    def max_vectors(self) -> int:
        return max(self.limits.vectors, len(self.preset.edits) if self.preset is not None else 0)

    def default_n(self, concept: str | None = None) -> int:
        """How many vectors a concept starts with: all of the preset's (or a shipped built spec's) edits, else 20."""
        concept = concept or self.default_concept
        if concept == PRESET and self.preset is not None:
            return len(self.preset.edits)
        if concept in (POSITIVE, NEGATIVE):
            from steer.presets import concept_preset_for

            shipped = concept_preset_for(self.model, concept, "up")
            return len(shipped.edits) if shipped is not None else 20
        return 20

    def default_mode(self, concept: str | None = None) -> str:
        return RAISE if (concept or self.default_concept) in (POSITIVE, NEGATIVE) else SUPPRESS

    def default_spec(self) -> Spec:
        """The intervention the page opens with: the detox preset, else the lexicon's top 20."""
        return self.concept_spec(self.default_concept, n=self.default_n())

    @property
    def concepts(self) -> list[str]:
        return [c for c in CONCEPTS if c != PRESET or self.preset is not None]

    def _check_exit(self) -> str | None:
        try:
            from steer import generation
        except ImportError as err:
            return f"the generation package is not available ({err})"
        needed = ["early_exit", "load_exit_model" if self._exit_source is not None else "fit_exit_model"]
        missing = [n for n in needed if not hasattr(generation, n)]
        return f"generation lacks {', '.join(missing)}" if missing else None

    @property
    def early_exit_available(self) -> bool:
        return self.exit_error is None

    @property
    def has_exit_model(self) -> bool:
        return self._exit_model is not None

    @property
    def threshold(self) -> float:
        """The exit threshold to offer: the one given, else the exit model's calibrated default."""
        if self.exit_threshold is not None:
            return self.exit_threshold
        return self._exit_model.default_threshold if self._exit_model is not None else 0.9

    def _exit_cache(self) -> Path:
        from steer.generation.exit_model import fingerprint

        return cache_dir() / "exit" / fingerprint(self.model)

    def exit_model(self):
        """The exit model: the one given (object or saved folder), else one fitted on first use.

        A fitted one is saved under the cache folder, keyed by the model's fingerprint, so it is
        fitted once per model. Fitting reads the "fit" split of the Python-docstring prose corpus
        (:func:`generation.corpus.docstring_text`) and runs the model with recording hooks, so it
        holds the model lock like any generation.
        """
        if self.exit_error is not None:
            raise ValueError(f"early exit is unavailable: {self.exit_error}")
        with self._side_lock:
            if self._exit_model is None:
                from steer import generation

                source = self._exit_source
                if source is None and self._exit_cache().exists():
                    source = self._exit_cache()
                if source is None:
                    from steer.generation.corpus import docstring_text

                    with self.lock:  # 16k tokens: a few minutes on CPU (131k saves ~2 points more; fit it offline)
                        fitted = generation.fit_exit_model(self.model, self.tokenizer, docstring_text("fit"),
                                                           max_tokens=16384)
                    fitted.save_atomic(self._exit_cache())  # kept as is if another process fitted it meanwhile
                    self._exit_model = fitted
                elif isinstance(source, (str, Path)):
                    self._exit_model = generation.load_exit_model(source)
                else:
                    self._exit_model = source
            return self._exit_model

    def scorer(self):
        """The toxicity scorer, loaded on first use; None (with :attr:`scorer_status`) if it cannot load."""
        with self._side_lock:
            if self._scorer is None and self._scorer_error is None:
                try:
                    from steer.evaluation.toxicity import get_toxicity_scorer

                    self._scorer = get_toxicity_scorer(self._scorer_name)
                except Exception as err:  # noqa: BLE001 - any failure means "no scores", said in the page
                    self._scorer_error = f"toxicity scorer unavailable: {type(err).__name__}: {err}"
            return self._scorer

    @property
    def scorer_status(self) -> str:
        if self._scorer is not None:
            return self._scorer.name
        return self._scorer_error or "loads on first use"

    def index(self) -> VocabIndex:
        with self._side_lock:
            if self._index is None:
                self._index = VocabIndex.build(self.model)
            return self._index

    # -- interventions ------------------------------------------------------------------------
    def concept(self, kind: str, words: str = "") -> Concept:
        if kind in (POSITIVE, NEGATIVE):
            return Concept.resolve(kind, self.tokenizer)
        if kind == LEXICON:
            if self._lexicon is None:
                self._lexicon = Concept.resolve("toxicity", self.tokenizer)
            return self._lexicon
        if kind == WORDS:
            words = self._check_words(words)
            return Concept.from_words(words, words.split(","), self.tokenizer)
        raise ValueError(f"unknown concept {kind!r}: choose one of {', '.join(self.concepts)}")

    def _check_words(self, words: str) -> str:
        words = (words or "").strip()
        if not words:
            raise ValueError("type one or more words, separated by commas")
        if len(words) > self.limits.words_chars:
            raise ValueError(f"the words are {len(words)} characters long; the limit is {self.limits.words_chars}")
        return words

    def concept_spec(self, kind: str, words: str = "", mode: str = SUPPRESS, strength: float = 1.0,
                     n: int = 20) -> Spec:
        """The intervention a concept setting stands for.

        Modes ``raise`` / ``lower (builder)``: the builder's spec for the concept (:meth:`built`),
        its first ``n`` vectors. ``suppress`` / ``promote`` (ranking only): the ``n`` value vectors
        ranked highest for the concept (mean z-score of its tokens, :func:`steer.rank_vectors`),
        each edited by ``scale 0`` or ``set 1``. The preset: its first ``n`` edits. Then
        :func:`apply_strength` (strength 1 = as built).
        """
        n = integer(n, "number of value vectors", low=1, high=self.max_vectors)
        if kind == PRESET:
            if self.preset is None:
                raise ValueError(f"no detox preset for this model: {self.preset_error}")
            base = dataclasses.replace(self.preset, edits=self.preset.edits[:n])
            name = self.preset.name
        elif mode in (RAISE, LOWER):
            base = self.built(kind, words, "up" if mode == RAISE else "down")
            base = base.first(min(n, len(base.edits)))
            name = base.name
        else:
            if mode not in MODES:
                raise ValueError(f"unknown mode {mode!r}: use one of {', '.join(map(repr, MODES))}")
            concept = self.concept(kind, words)
            op, value = ("scale", 0.0) if mode == SUPPRESS else ("set", 1.0)
            name = f"{mode} {concept.name if kind in (WORDS, POSITIVE, NEGATIVE) else 'toxicity'}"
            base = Spec.build(name, [(str(v), op, value) for v, _ in self.ranked(concept, n)], model=self.model)
        spec = apply_strength(base, strength)
        return dataclasses.replace(spec, name=f"{name} x{float(strength):g} top{n}")

    def built(self, kind: str, words: str, direction: str) -> Spec:
        """The builder's spec for a concept (:func:`steer.build.build_concept_spec`): a shipped one
        when there is one for this model, else built at demo size on first use and cached on disk."""
        import hashlib

        from steer.presets import concept_preset_for, fingerprint

        if kind in (POSITIVE, NEGATIVE):
            shipped = concept_preset_for(self.model, kind, direction)
            if shipped is not None:
                return shipped
            text = kind
        elif kind == LEXICON:
            text = "toxicity"
        elif kind == WORDS:
            text = self._check_words(words)
        else:
            raise ValueError(f"the builder needs a concept of words, not {kind!r}")
        key = hashlib.sha1(repr((text, direction, fingerprint(self.model), DEMO_BUILD)).encode()).hexdigest()[:12]
        path = cache_dir() / "specs" / f"{key}.json"
        if path.exists():
            return Spec.load(path).validate(self.model)
        from steer.build import build_concept_spec

        with self.lock:
            spec = build_concept_spec(self.model, self.tokenizer, text, direction, **DEMO_BUILD)
        path.parent.mkdir(parents=True, exist_ok=True)
        spec.save(path)
        return spec

    def ranked(self, concept: Concept, n: int) -> list[tuple[VectorName, float]]:
        """The ``n`` vectors promoting ``concept`` most, as :func:`steer.rank_vectors` orders them.

        The concept-independent part of the scores (about 30 GFLOP on the embedded model) is
        computed once per demo, so a new concept or a slider move costs one product a layer.
        """
        with self._side_lock:
            if self._concepts is None:
                self._concepts = ConceptScorer(self.model)
            scores = self._concepts.scores(concept)
        best = scores.flatten().topk(min(n, scores.numel()))
        return [(VectorName(*divmod(i, scores.shape[1])), v) for v, i in zip(best.values.tolist(), best.indices.tolist())]

    def spec_from_rows(self, rows, name: str = "ui", extra: dict | None = None) -> Spec:
        """A validated Spec from table rows ``[vector, op, value, ...]`` (blank rows skipped).

        ``extra`` carries the spec's other fields (model shape, meta, anything a spec file
        holds besides name and edits), so an uploaded spec round-trips through the table.
        """
        edits = []
        for i, row in enumerate(rows or []):
            vector, op, value = (list(row) + ["", "", ""])[:3]
            if not str(vector or "").strip():
                continue
            try:
                value = float(value)
            except (TypeError, ValueError, OverflowError):
                raise SpecError(f"row {i + 1} ({vector}): value must be a number, got {value!r}") from None
            edits.append({"vector": str(vector).strip(), "op": str(op).strip(), "value": value})
        if len(edits) > self.limits.edits:
            raise SpecError(f"the intervention has {len(edits)} edits; the limit is {self.limits.edits}")
        data = {**(extra or {}), "name": (name or "").strip() or "ui", "edits": edits}
        return Spec.from_dict(data, "intervention").validate(self.model)

    def load_spec(self, path: str | Path) -> Spec:
        spec = Spec.load(path).validate(self.model)
        if len(spec.edits) > self.limits.edits:
            raise SpecError(f"{Path(path).name} has {len(spec.edits)} edits; the limit is {self.limits.edits}")
        return spec

    @staticmethod
    def extra(spec: Spec) -> dict:
        """Everything in ``spec`` except its name and edits (see :meth:`spec_from_rows`)."""
        return {k: v for k, v in spec.to_dict().items() if k not in ("name", "edits")}

    def rows(self, spec: Spec) -> list[list]:
        tokens = self.top_tokens([VectorName(e.layer, e.index) for e in spec.edits])
        return [[e.name, e.op, e.value, t] for e, t in zip(spec.edits, tokens)]

    @torch.no_grad()
    def top_tokens(self, names: list[VectorName], n: int = 8) -> list[str]:
        """The ``n`` tokens each value vector promotes most, decoded and joined for display."""
        if not names:
            return []
        vectors = torch.stack([self.adapter.value_vectors(v.layer)[v.index] for v in names])
        logits = project(self.adapter, vectors.to(self.adapter.unembed.weight.dtype))
        return [" | ".join(repr(self.tokenizer.decode([i]))[1:-1] for i in ids)
                for ids in logits.float().topk(n, dim=1).indices.tolist()]

    # -- value-vector explorer ---------------------------------------------------------------
    def search(self, words: str, top: int = 20, method: str = BY_SCORE) -> list[list]:
        """Value vectors promoting ``words``: rows ``[vector, score, top tokens]``.

        ``z-score ranking``: mean z-score of the words' tokens in each vector's projection
        (all vectors, closed form). ``top-30 tokens``: vectors with any of those tokens among
        their 30 highest (:meth:`VocabIndex.search`; the score is that hit count).
        """
        top = integer(top, "number of results", low=1, high=self.limits.vectors)
        words = self._check_words(words)
        concept = Concept.from_words(words, words.split(","), self.tokenizer)
        if method == BY_SCORE:
            found = [(name, round(score, 3)) for name, score in self.ranked(concept, top)]
        elif method == BY_INDEX:
            found = [(name, hits) for name, hits, _ in self.index().search(concept.token_ids, top=top)]
        else:
            raise ValueError(f"unknown search method {method!r}: use {BY_SCORE!r} or {BY_INDEX!r}")
        tokens = self.top_tokens([name for name, _ in found])
        return [[str(name), score, t] for (name, score), t in zip(found, tokens)]

    @staticmethod
    def edit_rows(rows, vectors: str, op: str | None = None, value: float | None = None) -> list[list]:
        """``rows`` with the named vectors removed (``op`` None) or added/replaced as ``op value``."""
        names = [str(VectorName.parse(v)) for v in (vectors or "").replace(";", ",").split(",") if v.strip()]
        if not names:
            raise ValueError("name one or more value vectors, e.g. L25.N829, L3.N7")
        kept = [list(r) for r in rows or [] if str(r[0] or "").strip() and str(r[0]).strip() not in names]
        if op is None:
            return kept
        return kept + [[name, op, number(value, "value"), ""] for name in names]

    # -- generation ---------------------------------------------------------------------------
    def _check(self, prompt: str, sampling: Sampling) -> dict:
        """The request's prompt, tokenized, if it and the sampling settings are within the demo's limits."""
        check_prompt(prompt)
        if len(prompt) > self.limits.prompt_chars:
            raise SteerError(f"the prompt is {len(prompt)} characters long; the limit is {self.limits.prompt_chars}")
        n_tokens = len(self.tokenizer(prompt)["input_ids"])
        if n_tokens > self.limits.prompt_tokens:
            raise SteerError(f"the prompt is {n_tokens} tokens long; the limit is {self.limits.prompt_tokens}")
        whole_ok = isinstance(sampling.max_new_tokens, int) and not isinstance(sampling.max_new_tokens, bool)
        if not (whole_ok and 1 <= sampling.max_new_tokens <= self.limits.max_new_tokens):
            raise SteerError(f"max new tokens must be between 1 and {self.limits.max_new_tokens}, "
                             f"got {sampling.max_new_tokens}")
        number(sampling.temperature, "temperature (0 = greedy)", low=0.0, high=5.0)
        if number(sampling.top_p, "top-p", high=1.0) <= 0:
            raise SteerError(f"top-p must be in (0, 1], got {sampling.top_p}")
        integer(sampling.seed, "seed", low=0, high=2**32 - 1)
        return encode_prompt(self.tokenizer, self.model, prompt, sampling.max_new_tokens)[0]  # fits the context

    def _generation_config(self, sampling: Sampling):
        config = copy.deepcopy(self.model.generation_config)
        sample = sampling.temperature > 0
        config.update(max_new_tokens=sampling.max_new_tokens, do_sample=sample,
                      temperature=sampling.temperature if sample else None,
                      top_p=sampling.top_p if sample else None, top_k=0 if sample else None)
        if config.pad_token_id is None:
            config.pad_token_id = self.tokenizer.pad_token_id
        return config

    @torch.no_grad()
    def continue_one(self, prompt: str, spec: Spec | None, sampling: Sampling = Sampling(),
                     early_exit: bool = False, threshold: float | None = None) -> Continuation:
        """One continuation of ``prompt`` under ``spec`` (None: unsteered), unscored."""
        inputs = self._check(prompt, sampling)
        if early_exit and threshold is not None:
            threshold = number(threshold, "exit threshold", low=0.0, high=1.0)
        config = self._generation_config(sampling)
        exit_model = self.exit_model() if early_exit else None
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        with self.lock, ExitStack() as stack:
            if spec is not None:
                stack.enter_context(steering(self.model, spec))
            stats = None
            if early_exit:
                from steer.generation import early_exit as exiting

                threshold = self.threshold if threshold is None else float(threshold)
                stats = stack.enter_context(exiting(self.model, exit_model, threshold))
            torch.manual_seed(int(sampling.seed))
            start = time.perf_counter()
            compiled = dict(cache_implementation="static", compile_config=compile_config(self.model)) \
                if self.compile and not early_exit else {}
            output = self.model.generate(**inputs, generation_config=config, **compiled)
            seconds = time.perf_counter() - start
        new = output[0, inputs["input_ids"].shape[1]:]
        return Continuation(self.tokenizer.decode(new, skip_special_tokens=True), int(new.numel()), seconds,
                            None if stats is None else float(stats.layers_saved_fraction))

    def generate(self, prompt: str, spec: Spec | None, sampling: Sampling = Sampling(),
                 early_exit: bool = False, threshold: float | None = None) -> tuple[Continuation, Continuation]:
        """Unsteered and steered continuations (same seed), each with its toxicity score."""
        pair = [self.continue_one(prompt, s, sampling, early_exit, threshold) for s in (None, spec)]
        scorer = self.scorer()
        if scorer is None:
            return tuple(dataclasses.replace(c, scorer=self.scorer_status) for c in pair)
        scores = scorer.score([c.text for c in pair])
        return tuple(dataclasses.replace(c, toxicity=float(s), scorer=scorer.name) for c, s in zip(pair, scores))
