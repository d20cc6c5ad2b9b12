"""``steer eval`` (one or a few interventions, one table) and ``steer sweep CONFIG.yaml`` (a grid).

Both resume: rerun the same command after a crash or kill and finished batches are kept.
Data-parallel: ``accelerate launch --num_processes N -m steer sweep CONFIG.yaml``.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from steer.ui.commands import real
from steer.ui.commands.vectors import add_model_args

if TYPE_CHECKING:
    from steer.evaluation.sweep import SweepConfig


def _interventions(values: list[str] | None) -> list[str]:
    items = [v.strip() for value in values or ["none"] for v in value.split(",") if v.strip()]
    return list(dict.fromkeys(items)) or ["none"]


def _conflicts(args, interventions: list[str]) -> None:
    """Options that would be silently ignored are errors: the user meant something by them."""
    from steer.errors import SteerError

    if args.early_exit is None and args.exit_threshold is not None:
        raise SteerError("--exit-threshold needs --early-exit EXIT_MODEL")
    if interventions == ["none"] and (args.strength != 1.0 or args.n_vectors is not None):
        option = "--strength" if args.strength != 1.0 else "--n-vectors"
        raise SteerError(f"{option} changes an intervention, but only 'none' is evaluated: add --compare SPEC or preset")


def config_from_args(args) -> "SweepConfig":
    from steer.evaluation.sweep import SweepConfig

    _conflicts(args, _interventions(args.intervention))
    grid = dict(intervention=_interventions(args.intervention), strength=[args.strength],
                n_vectors=[args.n_vectors], early_exit=[args.early_exit is not None])
    data = dict(model=args.model, dtype=args.dtype, device=args.device, judge=args.judge, prompts=args.prompt_file,
                challenging=args.challenging, limit=args.prompts, samples=args.samples, top_p=args.top_p,
                max_new_tokens=args.max_new_tokens, seed=args.seed, batch_size=args.batch_size, scorer=args.scorer,
                detoxify_config=args.detoxify_config, grid=grid,
                early_exit=None if args.early_exit is None else {
                    "exit_model": args.early_exit, "threshold": 0.9 if args.exit_threshold is None else args.exit_threshold})
    if args.compile:  # only when asked, so the folder of an uncompiled run keeps its name
        data["compile"] = True
    config = SweepConfig.from_dict(data, "steer eval")
    if args.out is None:  # the same command always maps to the same folder, so rerunning it resumes
        key = hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:8]
        args.out = f"runs/eval-{key}"
    config.out = args.out
    return config


def _run(config, show_progress: bool) -> int:
    from steer.evaluation.protocol import process_shard
    from steer.evaluation.report import markdown_table
    from steer.evaluation.store import ensure_writable
    from steer.evaluation.sweep import run_sweep

    out = ensure_writable(config.out)
    rank = process_shard()[0]
    if rank == 0:
        saved = dataclasses.asdict(config)
        (out / "sweep.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    summaries = run_sweep(config, progress=show_progress)
    if rank == 0:
        print(markdown_table(summaries))
        print(f"results in {out}/: summary.md, summary.csv, pareto.png (rerun the same command to resume; "
              f"`steer sweep {out}/sweep.yaml` reruns it)")
    return 0


def _eval(args) -> int:
    if args.task == "toxicity":
        return _run(config_from_args(args), not args.quiet)
    return _eval_concept(args)


def _eval_concept(args) -> int:
    """Sentiment or topic: neutral prompts (the evaluation half), judged by VADER or a topic's judge list."""
    from steer.evaluation.prompts import load_prompts, neutral_prompts
    from steer.evaluation.steer_eval import Method, markdown_table, run_task
    from steer.evaluation.sweep import resolve_intervention
    from steer.models import load_model

    concept = args.concept or ("positive" if args.task == "sentiment" else None)
    if concept is None:
        raise ValueError("--task topic needs --concept TOPIC (computers, food, politics, science, sports)")
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    prompts = load_prompts(args.prompt_file, args.prompts) if args.prompt_file else neutral_prompts("evaluation")[:args.prompts]
    methods = []
    for item in _interventions(args.intervention):
        spec = resolve_intervention(model, item)
        if spec is None:
            methods.append(Method("none"))
            continue
        spec = spec.first(args.n_vectors) if args.n_vectors else spec
        methods.append(Method(Path(item).stem if item != "preset" else "preset", args.strength, spec.scaled(args.strength)))
    out = args.out or f"runs/eval-{args.task}-{concept.replace(':', '-')}"
    summaries = run_task(model, tokenizer, args.task, concept, methods, prompts, samples=args.samples, top_p=args.top_p,
                         max_new_tokens=args.max_new_tokens, seed=args.seed, batch_size=args.batch_size, out_dir=out)
    print(f"_{args.task} toward {concept}, judged by {summaries[0]['judge']}; perplexity under the unsteered model; "
          f"{len(prompts)} prompts x {args.samples} samples, top-p {args.top_p}, {args.max_new_tokens} new tokens, "
          f"seed {args.seed}_\n")
    base = next((s["perplexity"] for s in summaries if s["method"] == "none"), None)
    print(markdown_table(summaries, base))
    print(f"runs in {out}/ (rerun the same command to reuse them)")
    return 0


def _sweep(args) -> int:
    from steer.evaluation.sweep import SweepConfig

    config = SweepConfig.load(args.config)
    if args.out is not None:
        config.out = args.out
    return _run(config, not args.quiet)


def register(subparsers) -> None:
    ev = subparsers.add_parser(
        "eval", help="RealToxicityPrompts-style evaluation of one or more interventions, as one table",
        description="Samples continuations of toxic prompts and reports expected maximum toxicity, toxicity "
                    "probability, perplexity and distinct-n. Example: steer eval --compare none,preset --prompts 20 --samples 5")
    add_model_args(ev)
    ev.add_argument("--task", choices=("toxicity", "sentiment", "topic"), default="toxicity",
                    help="toxicity: RealToxicityPrompts protocol (default); sentiment / topic: neutral prompts (the "
                         "shipped evaluation half unless --prompt-file), success judged by VADER / a topic judge list")
    ev.add_argument("--concept", default=None,
                    help="sentiment: positive (default) or negative; topic: computers, food, politics, science, sports")
    ev.add_argument("--intervention", "--compare", action="append", metavar="SPEC",
                    help="none, preset (the shipped detox preset for this model) or a spec file; repeat or "
                         "comma-separate to compare several in one table (default: none)")
    ev.add_argument("--prompts", type=int, default=None, metavar="N", help="use the first N prompts (default: all)")
    ev.add_argument("--prompt-file", default=None, metavar="PATH",
                    help="RTP-format JSONL, a text file (one prompt a line) or hub:allenai/real-toxicity-prompts "
                         "(default: the shipped 400 challenging RealToxicityPrompts prompts)")
    ev.add_argument("--challenging", action="store_true", help="keep only prompts marked challenging")
    ev.add_argument("--samples", type=int, default=25, help="samples per prompt (default: 25)")
    ev.add_argument("--top-p", type=real, default=0.9, help="nucleus sampling p (default: 0.9)")
    ev.add_argument("--max-new-tokens", type=int, default=20, help="tokens per continuation (default: 20)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--batch-size", type=int, default=64, help="sequences per generate call (default: 64)")
    ev.add_argument("--strength", type=real, default=1.0, help="scale every intervention: 0 none .. 1 as written")
    ev.add_argument("--n-vectors", type=int, default=None, help="keep only each spec's first N vectors")
    ev.add_argument("--scorer", default="auto",
                    help="auto (Detoxify if its weights are here, else alt-profanity-check), profanity-check, "
                         "detoxify[:VARIANT|:PATH.ckpt], evaluate[:MODEL]")
    ev.add_argument("--detoxify-config", default=None, metavar="DIR",
                    help="folder with the HF config + tokenizer of a local Detoxify checkpoint's base model")
    ev.add_argument("--judge", default="embedded",
                    help="perplexity judge: embedded (default), self (the evaluated model, unsteered), or a model id/path")
    ev.add_argument("--early-exit", default=None, metavar="EXIT_MODEL", help="generate with early exit (an exit model file)")
    ev.add_argument("--exit-threshold", type=real, default=None, help="early-exit threshold (default: 0.9; needs --early-exit)")
    ev.add_argument("--compile", action="store_true",
                    help="static cache, decode step compiled (a CUDA graph on GPU) with the edits inside it")
    ev.add_argument("--out", default=None, metavar="DIR", help="run folder (default: runs/eval-<hash of the options>)")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.set_defaults(func=_eval)

    sw = subparsers.add_parser(
        "sweep", help="run a grid of evaluations from a YAML config (resumable, data-parallel with accelerate)",
        description="Keys: see evaluation/sweep.py. Data-parallel: accelerate launch --num_processes N -m steer sweep CONFIG.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sw.add_argument("config", type=Path, help="sweep config (YAML)")
    sw.add_argument("--out", default=None, metavar="DIR", help="run folder (default: the config's out, else runs/<config name>)")
    sw.add_argument("--quiet", action="store_true", help="no progress bars")
    sw.set_defaults(func=_sweep)
