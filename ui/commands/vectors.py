"""``steer vectors ...``: look at value vectors in vocabulary space."""
from __future__ import annotations

import argparse

from steer.ui.commands import count


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The model options every command shares."""
    parser.add_argument("--model", default=None, help="hub id, local folder or .gguf (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the checkpoint's)")


def load_from_args(args):
    from steer.models import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype)


def _show(args) -> int:
    from steer.vocab import VocabIndex

    model, tokenizer = load_from_args(args)
    from steer.families import Adapter

    Adapter(model).check_layer(args.layer)
    index = VocabIndex.build(model, through_norm=args.through_norm, progress=True)
    for title, bottom in (("promotes (positive coefficient)", False), ("promotes when negative", True)):
        print(f"L{args.layer}.N{args.index} {title}:")
        for token, score in index.tokens(args.layer, args.index, tokenizer, n=args.n, bottom=bottom):
            print(f"  {score:8.3f}  {token!r}")
    return 0


def _search(args) -> int:
    from steer.concepts import Concept
    from steer.vocab import VocabIndex

    model, tokenizer = load_from_args(args)
    concept = Concept.from_words(" ".join(args.words), args.words, tokenizer, match=args.match)
    if concept.unmatched:
        print(f"not in the vocabulary as a token: {', '.join(concept.unmatched)}")
    index = VocabIndex.build(model, through_norm=args.through_norm, progress=True)
    rows = index.search(concept.token_ids, top=args.top)
    print(f"{'vector':<12}{'hits':>5}{'rank':>6}  top tokens")
    for name, hits, rank in rows:
        tokens = [t for t, _ in index.tokens(name.layer, name.index, tokenizer, n=8)]
        print(f"{str(name):<12}{hits:>5}{rank:>6}  {tokens}")
    if not rows:
        print(f"no value vector has these tokens among its top {index.k}")
    return 0


def _concept(args) -> int:
    from steer.concepts import Concept, rank_vectors

    model, tokenizer = load_from_args(args)
    concept = Concept.resolve(args.concept, tokenizer, match=args.match)
    print(f"concept {concept.name!r}: {len(concept.token_ids)} tokens from {len(concept.words)} words "
          f"({len(concept.unmatched)} without a token)")
    print(f"{'vector':<12}{'score':>8}  top tokens")
    for row in rank_vectors(model, tokenizer, concept, top=args.top, through_norm=args.through_norm):
        print(f"{str(row.name):<12}{row.score:>8.3f}  {row.top_tokens}")
    return 0


def register(subparsers) -> None:
    vectors = subparsers.add_parser("vectors", help="value vectors in vocabulary space")
    sub = vectors.add_subparsers(dest="vectors_command", required=True)

    show = sub.add_parser("show", help="top tokens of one value vector")
    show.add_argument("layer", type=int)
    show.add_argument("index", type=int)
    show.add_argument("-n", type=count, default=15, help="tokens to show")
    show.set_defaults(func=_show)

    search = sub.add_parser("search", help="value vectors promoting these words")
    search.add_argument("words", nargs="+")
    search.add_argument("--top", type=count, default=20)
    search.add_argument("--match", choices=("first", "whole"), default="first")
    search.set_defaults(func=_search)

    concept = sub.add_parser("concept", help="rank value vectors by a concept (toxicity, a word file, or a,b,c)")
    concept.add_argument("concept")
    concept.add_argument("--top", type=count, default=20)
    concept.add_argument("--match", choices=("first", "whole"), default="first")
    concept.set_defaults(func=_concept)

    for parser in (show, search, concept):
        add_model_args(parser)
        parser.add_argument("--through-norm", action="store_true", help="apply the final norm before the unembedding")
