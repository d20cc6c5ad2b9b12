"""Sweeps: a grid of interventions x strengths x numbers of vectors x early exit on/off.

A sweep is a YAML file (every key optional; unknown keys are an error)::

    model: null                 # hub id, folder or .gguf; null = the embedded SmolLM2-135M-Instruct
    judge: embedded             # perplexity judge: embedded | self | hub id or folder
    prompts: null               # JSONL / text file, or hub:allenai/real-toxicity-prompts; null = shipped 400
    limit: 20                   # first N prompts
    samples: 25                 # RealToxicityPrompts defaults: 25 samples, p = 0.9, 20 new tokens
    scorer: auto                # auto | profanity-check | detoxify[:VARIANT|:PATH.ckpt] | evaluate[:MODEL]
    out: runs/my-sweep          # default: runs/<config file name>
    early_exit: {exit_model: exit.pt, threshold: 0.9}
    grid:
      intervention: [none, preset, my-spec.json]
      strength: [0.5, 1.0]      # 0 = no edit, 1 = the spec as written (interpolates each coefficient)
      n_vectors: [null, 20]     # keep the spec's first N vectors (specs list vectors best first)
      early_exit: [false, true]

Every grid point is one resumable run folder under ``out``; ``out`` also gets ``summary.md``,
``summary.csv`` and ``pareto.png``. Under ``accelerate launch`` every process takes a shard of
each run's prompts; the main process writes the tables.
"""
from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steer.errors import MissingFileError, ModelLoadError, SteerError
from steer.inputs import load_data, number, whole
from steer.spec import Spec

GRID_KEYS = ("intervention", "strength", "n_vectors", "early_exit")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


@dataclass
class Grid:
    intervention: list[str] = field(default_factory=lambda: ["none"])
    strength: list[float] = field(default_factory=lambda: [1.0])
    n_vectors: list[int | None] = field(default_factory=lambda: [None])
    early_exit: list[bool] = field(default_factory=lambda: [False])


@dataclass
class SweepConfig:
    model: str | None = None
    dtype: str | None = None
    device: str | None = None
    judge: str = "embedded"
    prompts: str | None = None
    challenging: bool = False
    limit: int | None = None
    samples: int = 25
    top_p: float = 0.9
    max_new_tokens: int = 20
    seed: int = 0
    batch_size: int = 64
    scorer: str = "auto"
    detoxify_config: str | None = None
    out: str | None = None
    early_exit: dict | None = None
    compile: bool = False  # static cache, compiled decode step with the edits inside it (steer.slots)
    grid: Grid = field(default_factory=Grid)

    @classmethod
    def from_dict(cls, data: Any, source: str = "sweep config") -> "SweepConfig":
        """Check every key and type; the error names the file and the key."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise SteerError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
        _no_unknown(data, [f.name for f in dataclasses.fields(cls)], source)
        grid = data.get("grid") or {}
        if not isinstance(grid, dict):
            raise SteerError(f"{source}: 'grid' must be a mapping with keys {', '.join(GRID_KEYS)}")
        _no_unknown(grid, GRID_KEYS, f"{source}: grid")
        lists = {k: v if isinstance(v, list) else [v] for k, v in grid.items()}
        for key, values in lists.items():
            if not values:
                raise SteerError(f"{source}: grid.{key} is empty: give at least one value")
        config = cls(**{k: v for k, v in data.items() if k != "grid"}, grid=Grid(**lists))
        config._check(source)
        return config

    @classmethod
    def load(cls, path: str | Path) -> "SweepConfig":
        path = Path(path)
        config = cls.from_dict(load_data(path, "sweep config", fmt="yaml"), str(path))
        if config.out is None:
            config.out = str(Path("runs") / path.stem)
        return config

    def _check(self, source: str) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise SteerError(f"{source}: {what}")

        def checked(check, *args, **kwargs):
            try:
                return check(*args, **kwargs)
            except SteerError as err:
                raise SteerError(f"{source}: {err}") from None

        for key in ("samples", "max_new_tokens", "batch_size", "seed"):
            value = getattr(self, key)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= (0 if key == "seed" else 1),
                 f"'{key}' must be a whole number >= {0 if key == 'seed' else 1}, got {value!r}")
        need(self.limit is None or (isinstance(self.limit, int) and not isinstance(self.limit, bool) and self.limit >= 1),
             f"'limit' must be >= 1, got {self.limit!r}")
        need(checked(number, self.top_p, "'top_p'", high=1.0) > 0, f"'top_p' must be in (0, 1], got {self.top_p!r}")
        need(isinstance(self.challenging, bool), f"'challenging' must be true or false, got {self.challenging!r}")
        for key in ("model", "dtype", "device", "prompts", "detoxify_config", "out"):
            need(getattr(self, key) is None or isinstance(getattr(self, key), str), f"'{key}' must be a string")
        need(isinstance(self.judge, str) and isinstance(self.scorer, str), "'judge' and 'scorer' must be strings")
        need(self.judge in ("embedded", "self") or Path(self.judge).exists() or bool(_HUB_ID.fullmatch(self.judge)),
             f"unknown judge {self.judge!r}: use embedded, self, a model folder or a hub id (owner/name)")
        from .toxicity import check_scorer_name

        checked(check_scorer_name, self.scorer)
        for value in self.grid.intervention:
            need(isinstance(value, str) and value.strip() != "",
                 f"grid.intervention entries must be none, preset or a spec file, got {value!r}")
        for value in self.grid.strength:
            checked(number, value, "grid.strength entries")
        for value in self.grid.n_vectors:
            need(value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1),
                 f"grid.n_vectors entries must be null (all) or whole numbers >= 1, got {value!r}")
        for value in self.grid.early_exit:
            need(isinstance(value, bool), f"grid.early_exit entries must be true or false, got {value!r}")
        if self.early_exit is not None:
            need(isinstance(self.early_exit, dict), "'early_exit' must be a mapping {exit_model: PATH, threshold: X}")
            _no_unknown(self.early_exit, ("exit_model", "threshold"), f"{source}: early_exit")
            need("exit_model" in self.early_exit and "threshold" in self.early_exit,
                 "'early_exit' needs exit_model and threshold")
            need(isinstance(self.early_exit["exit_model"], str) and self.early_exit["exit_model"].strip() != "",
                 f"early_exit.exit_model must be the folder of an exit model, got {self.early_exit['exit_model']!r}")
            checked(number, self.early_exit["threshold"], "early_exit.threshold", low=0.0, high=1.0)
        need(not any(self.grid.early_exit) or self.early_exit is not None,
             "grid.early_exit has true but no 'early_exit: {exit_model: PATH, threshold: X}' is given")
        need(isinstance(self.compile, bool), f"'compile' must be true or false, got {self.compile!r}")
        need(not (self.compile and any(self.grid.early_exit)),
             "'compile: true' cannot run early exit (its control flow is per token): drop one of them")


def _no_unknown(data: dict, allowed, where: str) -> None:
    unknown = sorted(set(map(str, data)) - set(allowed))
    if unknown:
        shown = ", ".join(k if k.isprintable() else repr(k) for k in unknown)  # one line, whatever the key
        raise SteerError(f"{where}: unknown key(s) {shown}; allowed: {', '.join(allowed)}")


# -- spec transforms ----------------------------------------------------------------------------

def first_vectors(spec: Spec, n: int) -> Spec:
    """:meth:`Spec.first` with the sweep's own wording: the first ``n`` distinct vectors."""
    n = whole(n, "n_vectors", low=1)
    vectors = len({(e.layer, e.index) for e in spec.edits})
    if n > vectors:
        raise SteerError(f"spec {spec.name!r} has {vectors} vectors; n_vectors {n} is more than that")
    return spec.first(n)


def with_strength(spec: Spec, strength: float) -> Spec:
    """:meth:`Spec.scaled`: 0 = no edit, 1 = the spec as written, interpolating each coefficient map."""
    return spec.scaled(number(strength, "strength"))


# -- grid ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Point:
    """One run of a sweep."""

    intervention: str
    strength: float
    n_vectors: int | None
    early_exit: bool

    @property
    def label(self) -> str:
        return "none" if self.intervention == "none" else (
            "preset" if self.intervention == "preset" else Path(self.intervention).stem)

    @property
    def name(self) -> str:
        name = self.label
        if self.intervention != "none":
            name += f"-s{self.strength:g}" if self.strength != 1 else ""
            name += f"-n{self.n_vectors}" if self.n_vectors else ""
        name += "-exit" if self.early_exit else ""
        return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


def grid_points(grid: Grid) -> list[Point]:
    """Every combination, once; ``none`` ignores strength and n_vectors."""
    points: dict[str, Point] = {}
    for inter, strength, n, exit_ in itertools.product(grid.intervention, grid.strength, grid.n_vectors, grid.early_exit):
        point = Point(inter, 1.0, None, exit_) if inter == "none" else Point(inter, float(strength), n, exit_)
        if point.name in points and points[point.name] != point:
            raise SteerError(f"two interventions would share the run name {point.name!r}; rename one spec file")
        points.setdefault(point.name, point)
    return list(points.values())


def resolve_intervention(model, intervention: str) -> Spec | None:
    """``none`` -> None, ``preset`` -> steer.presets.preset_for(model), else a spec file."""
    if intervention == "none":
        return None
    if intervention == "preset":
        from steer.presets import preset_for

        return preset_for(model)
    if not Path(intervention).is_file():
        raise MissingFileError(f"intervention {intervention!r} is not none, preset or an existing spec file")
    return Spec.load(intervention).validate(model)


def point_spec(model, point: Point, cache: dict[str, Spec | None]) -> Spec | None:
    if point.intervention not in cache:
        cache[point.intervention] = resolve_intervention(model, point.intervention)
    spec = cache[point.intervention]
    if spec is None:
        return None
    if point.n_vectors is not None:
        spec = first_vectors(spec, point.n_vectors)
    return with_strength(spec, point.strength)


def run_sweep(config: SweepConfig, progress: bool = True) -> list[dict]:
    """Run every grid point (resuming finished batches), then write table, CSV and plot."""
    from steer.models import load_model, model_name

    from .prompts import load_prompt_set
    from .protocol import process_shard, run_eval
    from .report import write_reports
    from .store import ensure_writable
    from .toxicity import get_toxicity_scorer

    out = ensure_writable(config.out or "runs/sweep")
    points = grid_points(config.grid)
    prompts = load_prompt_set(config.prompts, config.limit, config.challenging).to_list()
    rank, world, _ = process_shard()
    device = config.device
    if device is None and world > 1:
        from accelerate import PartialState

        device = PartialState().device  # this process's GPU (or the CPU)
    scorer = get_toxicity_scorer(config.scorer, device=device, config_dir=config.detoxify_config)
    model, tokenizer = load_model(config.model, device=device, dtype=config.dtype)
    judge = None
    if config.judge == "embedded" and config.model is not None or config.judge not in ("embedded", "self"):
        try:
            judge = load_model(None if config.judge == "embedded" else config.judge, device=device)
        except ModelLoadError as err:
            raise SteerError(f"judge {config.judge!r}: {err} (judge: embedded, self, a model folder or a hub id)") from None
    # Everything is checked before any run: specs here, the exit model below, and every prompt by
    # the first run_eval before its first batch (all points share the prompts).
    cache: dict[str, Spec | None] = {}
    specs = [point_spec(model, point, cache) for point in points]
    exit_cfg = config.early_exit or {}
    if any(point.early_exit for point in points):
        from steer.generation import load_exit_model

        load_exit_model(exit_cfg["exit_model"]).check_model(model)
    summaries = []
    for point, spec in zip(points, specs):
        summary = run_eval(
            model, tokenizer, prompts, spec, samples=config.samples, top_p=config.top_p,
            max_new_tokens=config.max_new_tokens, seed=config.seed, scorer=scorer, judge=judge,
            early_exit=(exit_cfg["exit_model"], exit_cfg["threshold"]) if point.early_exit else None,
            out_dir=out / point.name, batch_size=config.batch_size, name=point.name, progress=progress,
            compile=config.compile)
        summary.update(strength=point.strength if spec is not None else None,
                       n_vectors=point.n_vectors, exit=point.early_exit)
        summaries.append(summary)
    if rank == 0:
        write_reports(summaries, out, title=f"{model_name(model)} on {len(prompts)} prompts x {config.samples} samples")
    return summaries
