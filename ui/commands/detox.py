"""``steer detox ...``: build a detox intervention for a model, or show what one does."""
from __future__ import annotations

import sys
import time

from steer.ui.commands import count, natural, real
from steer.ui.commands.vectors import add_model_args, load_from_args


def _build(args) -> int:
    from steer.build import build_detox_spec

    from steer.evaluation.toxicity import check_scorer_name

    if args.out is None:
        raise ValueError("--out FILE is required (a .json or .yaml spec to write)")
    check_scorer_name(args.scorer)
    model, tokenizer = load_from_args(args)
    start = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {message}", file=sys.stderr, flush=True)

    spec = build_detox_spec(model, tokenizer, count=args.count, lam=args.lam, ppl_budget=args.ppl_budget,
                            samples=args.samples, max_new_tokens=args.max_new_tokens, scorer=args.scorer,
                            batch_size=args.batch_size, seed=args.seed, name=args.name, work_dir=args.work_dir,
                            progress=say)
    path = spec.save(args.out)
    meta = spec.meta
    print(f"wrote {path}: {len(spec.edits)} edits (held-out: toxic log-likelihood {meta['held_out_change']:+} "
          f"nats per toxic word, KL {meta['held_out_kl']} nats/token, estimated perplexity rise "
          f"{meta['held_out_ppl_rise']:+.1%})")
    return 0


def _show(args) -> int:
    from steer.build import next_token_effect, split_groups, toxic_prompts
    from steer.presets import preset_for
    from steer.spec import Spec
    from steer.vocab import VocabIndex

    model, tokenizer = load_from_args(args)
    spec = Spec.load(args.spec).validate(model) if args.spec else preset_for(model)
    index = VocabIndex.build(model, progress=True)
    print(f"{spec.name}: {len(spec.edits)} edits")
    print(f"{'vector':<12}{'edit':<14}  promotes (+v) | promotes (-v)")
    for edit in spec.edits[:args.top]:
        plus, minus = ([_readable(tokenizer, t) for t, _ in index.tokens(edit.layer, edit.index, tokenizer, n=args.n,
                                                                         bottom=bottom)] for bottom in (False, True))
        print(f"{edit.name:<12}{edit.op + ' ' + format(edit.value, '.3g'):<14}  {' '.join(plus)} | {' '.join(minus)}")
    held_out = split_groups(toxic_prompts())[1]
    lowered, raised = next_token_effect(model, tokenizer, spec, held_out)
    print(f"\nnext token after {len(held_out)} held-out toxicity-leaning selection prompts, log(p steered / p unsteered):")
    for title, rows in (("lowered most", lowered), ("raised most", raised)):
        print(f"  {title}: " + ", ".join(f"{t.strip() or repr(t)} {v:+.2f}" for t, v in rows))
    return 0


def _readable(tokenizer, token: str) -> str:
    """A vocabulary token as text (byte-level pieces decoded); whitespace-only tokens shown escaped."""
    text = tokenizer.convert_tokens_to_string([token]).strip()
    return text.replace(" ", "·") if text else repr(tokenizer.convert_tokens_to_string([token]))


def register(subparsers) -> None:
    detox = subparsers.add_parser("detox", help="detoxify by editing value vectors (build / show)")
    sub = detox.add_subparsers(dest="detox_command", required=True)

    build = sub.add_parser("build", help="choose value-vector edits that lower toxicity, write a spec",
                           description="Samples the model on shipped toxicity-leaning and neutral prompts "
                                       "(never the evaluation prompts), attributes the toxic words to FFN "
                                       "coefficients by gradients, and picks edits and their count on "
                                       "held-out prompts. Minutes on a GPU; about an hour on 2 CPU cores.")
    build.add_argument("--out", help="spec file to write (.json or .yaml)")
    build.add_argument("--count", type=count, default=None, help="number of vectors (default: chosen on held-out prompts)")
    build.add_argument("--lam", type=real, default=None, help="weight of the KL cost (default: chosen on held-out prompts)")
    build.add_argument("--ppl-budget", type=real, default=0.06,
                       help="max estimated perplexity rise on held-out samples (0.06 = +6%%)")
    build.add_argument("--samples", type=count, default=4, help="continuations sampled per selection prompt")
    build.add_argument("--max-new-tokens", type=count, default=20)
    build.add_argument("--scorer", default="profanity-check", help="toxicity scorer for the samples' words")
    build.add_argument("--batch-size", type=count, default=16)
    build.add_argument("--seed", type=natural, default=0)
    build.add_argument("--name", default="detox", help="name recorded in the spec")
    build.add_argument("--work-dir", default=None, help="keep the sampled text here; a rerun skips sampling")
    build.set_defaults(func=_build)

    show = sub.add_parser("show", help="the edits of a detox spec and the top tokens of their vectors")
    show.add_argument("spec", nargs="?", help="spec file (default: the shipped preset for the model)")
    show.add_argument("-n", type=count, default=8, help="tokens per direction")
    show.add_argument("--top", type=count, default=50, help="edits to show")
    show.set_defaults(func=_show)

    for parser in (build, show):
        add_model_args(parser)
