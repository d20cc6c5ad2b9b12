"""``steer early-exit fit|eval`` and ``steer generate`` (with optional steering and early exit)."""
from __future__ import annotations

import time
from pathlib import Path

from steer.ui.commands import count, fraction, natural, real
from steer.ui.commands.vectors import add_model_args, load_from_args

DOCSTRINGS = "docstrings"
OWN = "own"  # the model's own samples from a prompt mix (generation.selfgen): the default fit text


def _read_text(value: str | None, split: str) -> str:
    """``FILE``, or the built-in docstring corpus (``docstrings``) in ``split``."""
    if value is None or value == DOCSTRINGS:
        from steer.generation.corpus import docstring_text

        return docstring_text(split, max_chars=2_000_000)
    from steer.errors import SteerError
    from steer.inputs import read_text

    path = Path(value)
    if not path.is_file():
        raise SteerError(f"text file not found: {path} (or pass --text {DOCSTRINGS} for Python's docstrings)")
    text = read_text(path, "--text")
    if not text.strip():
        raise SteerError(f"--text {path} is empty: give a file of prose (or --text {DOCSTRINGS})")
    return text


def _fit(args) -> int:
    from steer.generation.fit import fit_exit_model

    text = None if args.text == OWN else _read_text(args.text, "fit")
    layers = _layers(args.layers) if args.layers else None
    model, tokenizer = load_from_args(args)
    spec = None
    if args.intervention:
        from steer import Spec

        spec = Spec.load(args.intervention).validate(model)
    start = time.perf_counter()
    exit_model = fit_exit_model(model, tokenizer, text, layers=layers, max_tokens=args.max_tokens,
                                target_agreement=args.target, target_kl=args.target_kl,
                                target_ppl_rise=args.target_ppl_rise, spec=spec, progress=True)
    folder = exit_model.save(args.out)
    info = exit_model.info
    print(f"fitted on {info['tokens']} tokens in {time.perf_counter() - start:.0f} s; check layers "
          f"{exit_model.check_layers[0]}..{exit_model.check_layers[-1]}; oracle saves {info['oracle_saved']:.1%} (out-of-fold)")
    point = next(p for p in info["calibration"] if p[0] == exit_model.default_threshold)
    print(f"default threshold {exit_model.default_threshold}: saves {point[1]:.1%} at {point[2]:.1%} top-1 agreement, "
          f"KL {point[3]:.3f} nats, perplexity {point[4]:+.1%} on held-back fit tokens; exit inverse temperatures "
          f"{exit_model.exit_scale}")
    print(f"saved to {folder}")
    return 0


def _layers(text: str) -> list[int]:
    from steer.errors import SteerError

    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise SteerError(f"--layers takes layer numbers separated by commas, e.g. 8,12,16; got {text!r}") from None


def _parse_thresholds(values: list[str] | None) -> dict | None:
    if not values:
        return None
    from steer.generation.exit_model import RULES
    from steer.generation.rules import check_threshold

    out: dict[str, list[float]] = {}
    for value in values:
        rule, _, numbers = value.partition("=")
        if rule not in RULES or not numbers:
            raise ValueError(f"--thresholds takes RULE=T1,T2 with RULE in {', '.join(RULES)}; got {value!r}")
        try:
            out[rule] = [check_threshold(float(x)) for x in numbers.split(",")]
        except ValueError as err:
            raise ValueError(f"--thresholds {value!r}: {err}") from None
    return out


def _eval(args) -> int:
    from steer.evaluation.early_exit import evaluate, plot
    from steer.generation.exit_model import load_exit_model

    thresholds = _parse_thresholds(args.thresholds)
    exit_model = load_exit_model(args.exit_model)
    text = _read_text(args.text, "heldout")
    model, tokenizer = load_from_args(args)
    exit_model.check_model(model)
    report = evaluate(model, tokenizer, text, exit_model, thresholds=thresholds, max_tokens=args.max_tokens,
                      real_chunks=args.real_chunks, prompts=args.prompts, max_new_tokens=args.new_tokens,
                      repeats=args.repeats)
    print(report.table())
    if args.plot:
        print(f"curve saved to {plot(report, args.plot, title=f'early exit, {exit_model.model_name}')}")
    if args.json:
        Path(args.json).write_text(report.to_json())
        print(f"results saved to {args.json}")
    return 0


def _generate(args) -> int:
    from contextlib import ExitStack

    import torch

    from steer import Spec, steering
    from steer.errors import SteerError
    from steer.inputs import check_prompt, encode_prompt

    # everything that needs no model is checked before one loads
    check_prompt(args.prompt)
    if args.early_exit is None and (args.threshold is not None or args.rule is not None):
        raise SteerError(f"{'--threshold' if args.threshold is not None else '--rule'} needs --early-exit DIR")
    if args.top_p == 0:
        raise SteerError("--top-p must be in (0, 1]; leave it out for greedy decoding")
    spec = Spec.load(args.intervention) if args.intervention else None
    exit_model = None
    if args.early_exit:
        from steer.generation.exit_model import load_exit_model

        exit_model = load_exit_model(args.early_exit)
    model, tokenizer = load_from_args(args)
    if spec is not None:
        spec.validate(model)
    if exit_model is not None:
        exit_model.check_model(model)
    inputs, note = encode_prompt(tokenizer, model, args.prompt, args.max_new_tokens, truncate=args.truncate)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    with ExitStack() as stack:
        if spec is not None:
            stack.enter_context(steering(model, spec))
        stats = None
        if exit_model is not None:
            from steer.generation.runtime import early_exit

            threshold = exit_model.default_threshold if args.threshold is None else args.threshold
            stats = stack.enter_context(early_exit(model, exit_model, threshold, rule=args.rule))
        torch.manual_seed(args.seed)
        sample = args.top_p is not None
        start = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=sample,
                             top_p=args.top_p if sample else None, pad_token_id=tokenizer.pad_token_id)
        seconds = time.perf_counter() - start
    new = out[0, inputs["input_ids"].shape[1]:]
    if note:
        print(f"[{note}]")
    print(tokenizer.decode(new, skip_special_tokens=True))
    note = f"[{len(new)} tokens in {seconds:.2f} s"
    if stats is not None:
        note += f"; early exit saved {stats.layers_saved_fraction:.1%} of layer compute (threshold {threshold})"
    print(note + "]")
    return 0


def register(subparsers) -> None:
    early = subparsers.add_parser("early-exit", help="fit and evaluate FFN-saturation early exit")
    sub = early.add_subparsers(dest="early_exit_command", required=True)

    fit = sub.add_parser("fit", help="fit layer maps and the exit classifier on a text")
    fit.add_argument("--text", default=OWN, help=f"'{OWN}' (default: the model's own samples from a mix of chat, "
                     f"narrative, news and code prompts), a UTF-8 text file, or '{DOCSTRINGS}' (Python's docstrings)")
    fit.add_argument("--out", required=True, help="folder to write the exit model to")
    fit.add_argument("--max-tokens", type=count, default=131072, help="tokens of the text (or of own samples) to use "
                     "(default 131072; the classifier's MLP needs about 100k to beat a linear probe)")
    fit.add_argument("--layers", default=None, help="check layers, e.g. 8,12,16 (default: a quarter of the depth "
                                                    "up to the second-to-last layer)")
    fit.add_argument("--target", type=fraction, default=0.95, help="agreement the default threshold must reach")
    fit.add_argument("--target-kl", type=real, default=None, help="also: mean KL to the full model at most this "
                                                                    "(nats a token)")
    fit.add_argument("--target-ppl-rise", type=real, default=None, help="also: perplexity rise at most this (0.08: +8%%)")
    fit.add_argument("--intervention", default=None, help="spec file: fit for the model steered by it, so exited "
                                                         "tokens carry the edits of the layers they skip")
    fit.set_defaults(func=_fit)

    ev = sub.add_parser("eval", help="side-by-side table and curve on held-out text")
    ev.add_argument("--exit-model", required=True, help="folder written by `steer early-exit fit`")
    ev.add_argument("--text", default=DOCSTRINGS, help=f"held-out text file (default: '{DOCSTRINGS}', the held-out "
                                                       "split of Python's docstrings)")
    ev.add_argument("--thresholds", nargs="*", default=None, metavar="RULE=T1,T2",
                    help="thresholds for the real runs, e.g. classifier=0.8,0.9 confidence=0.9 (default: the "
                         "threshold reaching 95%% simulated agreement and one either side, per rule)")
    ev.add_argument("--max-tokens", type=count, default=4096)
    ev.add_argument("--real-chunks", type=count, default=8, help="128-token chunks for the real teacher-forced runs")
    ev.add_argument("--prompts", type=natural, default=4, help="prompts for greedy match and tokens/s (0: skip)")
    ev.add_argument("--new-tokens", type=count, default=32)
    ev.add_argument("--repeats", type=count, default=3)
    ev.add_argument("--plot", default="docs/early_exit.png", help="PNG for the curve ('' to skip)")
    ev.add_argument("--json", default=None, help="also write all numbers to this JSON file")
    ev.set_defaults(func=_eval)

    gen = subparsers.add_parser("generate", help="continue a prompt, optionally steered and with early exit")
    gen.add_argument("prompt")
    gen.add_argument("--max-new-tokens", type=count, default=40)
    gen.add_argument("--intervention", default=None, help="spec file (JSON/YAML) to steer with")
    gen.add_argument("--early-exit", default=None, metavar="DIR", help="exit model folder: turns early exit on")
    gen.add_argument("--threshold", type=fraction, default=None, help="exit threshold in [0, 1] (default: the exit "
                                                                    "model's, chosen for 95%% agreement)")
    gen.add_argument("--rule", default=None, choices=("classifier", "confidence"),
                     help="exit rule (default: classifier; needs --early-exit)")
    gen.add_argument("--truncate", action="store_true",
                     help="keep only the prompt's last tokens when it does not fit the model's context with "
                          "--max-new-tokens (said in the output); without it such a prompt is an error")
    gen.add_argument("--top-p", type=fraction, default=None, help="sample with nucleus p (default: greedy)")
    gen.add_argument("--seed", type=natural, default=0)
    gen.set_defaults(func=_generate)

    for parser in (fit, ev, gen):
        add_model_args(parser)
