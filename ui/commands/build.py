"""``steer build``: value-vector edits that move any concept up or down (the builder behind ``steer detox build``)."""
from __future__ import annotations

import sys
import time

from steer.ui.commands.vectors import add_model_args, load_from_args


def _build(args) -> int:
    from steer.build import build_concept_spec
    from steer.evaluation.prompts import load_prompts

    model, tokenizer = load_from_args(args)
    start = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {message}", file=sys.stderr, flush=True)

    prompts = load_prompts(args.prompt_file) if args.prompt_file else None
    spec = build_concept_spec(model, tokenizer, args.concept, args.direction, prompts=prompts, prompt_limit=args.prompts,
                              count=args.count, lam=args.lam, ppl_budget=args.ppl_budget, samples=args.samples,
                              max_new_tokens=args.max_new_tokens, prior_weight=args.prior_weight,
                              batch_size=args.batch_size, seed=args.seed, name=args.name, work_dir=args.work_dir,
                              progress=say)
    path = spec.save(args.out)
    meta = spec.meta
    print(f"wrote {path}: {len(spec.edits)} edits (held-out selection samples: {meta['target']} log-likelihood "
          f"{meta['held_out_change']:+} nats per span, estimated perplexity rise {meta['held_out_ppl_rise']:+.1%})")
    return 0


def register(subparsers) -> None:
    build = subparsers.add_parser(
        "build", help="choose value-vector edits that move a concept up or down, write a spec",
        description="Samples the model on selection prompts (default: the selection half of the shipped neutral "
                    "prompts; never evaluation prompts), marks the concept's words in its own text and forces them "
                    "where it would plausibly write them, attributes them to FFN coefficients by gradients (the "
                    "vocabulary projection as prior) and picks edits and their count under a perplexity budget on "
                    "held-out selection prompts. Example: steer build --concept positive --direction up --out pos.json")
    build.add_argument("--concept", required=True,
                       help="comma-separated words, a file (one word a line), a built-in (positive, negative, toxicity, "
                            "topic:NAME) or scorer:NAME (vader-positive, vader-negative, profanity-check)")
    build.add_argument("--direction", choices=("up", "down"), default="up")
    build.add_argument("--out", required=True, help="spec file to write (.json or .yaml)")
    build.add_argument("--prompt-file", default=None, help="selection prompts, one a line (default: shipped neutral selection half)")
    build.add_argument("--prompts", type=int, default=None, metavar="N", help="only the first N selection prompts")
    build.add_argument("--count", type=int, default=None, help="number of vectors (default: chosen on held-out prompts)")
    build.add_argument("--lam", type=float, default=None, help="weight of the KL cost (default: chosen on held-out prompts)")
    build.add_argument("--ppl-budget", type=float, default=0.06, help="max estimated perplexity rise (0.06 = +6%%)")
    build.add_argument("--samples", type=int, default=4, help="continuations sampled per selection prompt")
    build.add_argument("--max-new-tokens", type=int, default=20)
    build.add_argument("--prior-weight", type=float, default=0.5, help="weight of the vocabulary-projection prior")
    build.add_argument("--batch-size", type=int, default=16)
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--name", default=None, help="name recorded in the spec (default: CONCEPT-DIRECTION)")
    build.add_argument("--work-dir", default=None, help="keep the sampled text here; a rerun skips sampling")
    add_model_args(build)
    build.set_defaults(func=_build)
