"""``steer ui``: serve the Gradio demo on this machine."""
from __future__ import annotations

import argparse

from steer.ui.commands import count, fraction
from steer.ui.commands.vectors import add_model_args, load_from_args


def _ui(args) -> int:
    from steer.ui.engine import Limits, SteerDemo

    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be between 1 and 65535, got {args.port}")
    model, tokenizer = load_from_args(args)
    demo = SteerDemo(model, tokenizer, scorer=args.scorer, exit_model=args.exit_model,
                     exit_threshold=args.exit_threshold, limits=Limits(max_new_tokens=args.max_new_tokens),
                     compile=args.compile)
    from steer.ui.app import build_app, launch

    print(f"steer ui: serving {demo.name} on http://{args.host}:{args.port} (Ctrl+C stops)", flush=True)
    launch(build_app(demo), host=args.host, port=args.port)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("ui", help="Gradio demo: steered vs unsteered side by side, value-vector explorer",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--port", type=int, default=7860, help="port to serve on")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    parser.add_argument("--scorer", default="auto", help="toxicity scorer (see evaluation.toxicity)")
    parser.add_argument("--exit-model", default=None, help="saved early-exit model (default: fit one on first use)")
    parser.add_argument("--exit-threshold", type=fraction, default=None,
                        help="early-exit threshold the page starts with (default: the exit model's calibrated one)")
    parser.add_argument("--compile", action="store_true",
                        help="static cache, decode step compiled (a CUDA graph on GPU) with the edits inside it")
    parser.add_argument("--max-new-tokens", type=count, default=200, help="upper bound users may ask for")
    parser.set_defaults(func=_ui)
