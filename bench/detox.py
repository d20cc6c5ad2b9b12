"""Detox side by side: unsteered, word filter, Geva-style 10 "safe" vectors set to 3, our preset.

Same prompts, seeds and batching for all four (RealToxicityPrompts protocol: nucleus p = 0.9,
20 new tokens, ``--samples`` per prompt; perplexity of each continuation given its prompt under
the unsteered model as judge). Configurations:

* ``none``: the model as is;
* ``word-filter``: ``bad_words_ids`` banning every tokenization of the lexicon's words
  (``steer/data/profanity_en.csv``, entries and canonical forms, as `` w``, `` W`` and ``w``);
* ``geva10``: the 10 value vectors ranked highest by ``steer.rank_vectors`` for a "safe" concept
  (SAFE_WORDS below: polite, calm, kind words) with coefficient set to 3, as Geva et al. 2022 did
  by hand on GPT-2;
* ``preset``: ``steer.presets.preset_for(model)`` (or ``--preset FILE``).

Two stages, so generation can run on a GPU machine that only has torch, transformers and datasets:

    python bench/detox.py --stage generate --device cuda --out runs/detox   # continuations + judge perplexity (JSONL)
    python bench/detox.py --stage score --out runs/detox --docs docs        # toxicity, distinct-2, table, plot

``--stage all`` (default) does both here; ``--prompts 40 --samples 5`` for a quick CPU check.
Last line: ``RESULT tox_prob_cut=... emt_cut=... ppl_rise=... distinct2_drop=...`` (preset vs none).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIGS = ("none", "word-filter", "geva10", "preset")
LABELS = {"none": "unsteered", "word-filter": "word filter (bad_words_ids)",
          "geva10": "Geva-style: 10 safe vectors set to 3", "preset": "our preset"}
SHORT = {"none": "unsteered", "word-filter": "word filter", "geva10": "Geva-style 10 set to 3", "preset": "our preset"}
SAFE_WORDS = "kind,gentle,peace,love,thanks,thank,friend,friends,help,calm,respect,polite,please,care,hope,happy,welcome,grateful,safe,sorry"


class DeferredScorer:
    """Stands in for the toxicity scorer where it is not installed; the score stage fills it in."""

    name = "deferred"

    def score(self, texts):
        return [math.nan] * len(texts)


def lexicon_bad_words(tokenizer) -> list[list[int]]:
    """Every tokenization of every lexicon word, as ``bad_words_ids``."""
    words = set()
    with resources.files("steer").joinpath("data/profanity_en.csv").open(encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            words.update(w.strip() for k in ("text", "canonical_form_1", "canonical_form_2", "canonical_form_3")
                         if (w := row[k]) and w.strip())
    sequences = {tuple(tokenizer.encode(s, add_special_tokens=False))
                 for w in words for s in (" " + w, " " + w[:1].upper() + w[1:], w)}
    return sorted(list(s) for s in sequences if s)


def geva_spec(model, tokenizer):
    from steer import Concept, Spec, rank_vectors

    concept = Concept.resolve(SAFE_WORDS, tokenizer)
    rows = rank_vectors(model, tokenizer, concept, top=10)
    return Spec.build("geva10-safe-set3", [(str(r.name), "set", 3.0) for r in rows], model=model,
                      concept=SAFE_WORDS, ranking="steer.rank_vectors (mean z-score in vocabulary projection)")


def generate(args) -> None:
    import torch

    from steer.evaluation.prompts import load_prompts
    from steer.evaluation.protocol import run_eval
    from steer import Spec, load_model
    from steer.presets import preset_for

    model, tokenizer = load_model(args.model, device=args.device)
    prompts = load_prompts(args.prompt_file, args.prompts)
    scorer = DeferredScorer()
    for name in args.configs:
        spec, settings = None, None
        if name == "word-filter":
            settings = dict(bad_words_ids=lexicon_bad_words(tokenizer))
        elif name == "geva10":
            spec = geva_spec(model, tokenizer)
        elif name == "preset":
            spec = Spec.load(args.preset).validate(model) if args.preset else preset_for(model)
        print(f"== {name}: {LABELS[name]} ({len(prompts)} prompts x {args.samples})", flush=True)
        with torch.no_grad():
            run_eval(model, tokenizer, prompts, spec, samples=args.samples, top_p=0.9, max_new_tokens=20,
                     seed=args.seed, scorer=scorer, out_dir=Path(args.out) / name, batch_size=args.batch_size,
                     name=name, progress=True, generate_kwargs=settings)


def score(args) -> dict[str, dict]:
    from steer.evaluation.protocol import summarize
    from steer.evaluation.store import RunStore
    from steer.evaluation.toxicity import get_toxicity_scorer

    scorer = get_toxicity_scorer(args.scorer)
    results = {}
    for name in args.configs:
        folder = Path(args.out) / name
        if not (folder / "config.json").exists():
            print(f"{folder}: no run here, skipped", file=sys.stderr)
            continue
        config = json.loads((folder / "config.json").read_text())
        batches = RunStore(folder, config).batches()
        for _, rows in batches.values():
            for row in rows:
                row["toxicity"] = scorer.score(row["continuations"])
        info = {k: config.get(k) for k in ("model", "intervention", "n_edits", "judge", "samples", "seed")}
        results[name] = summarize(batches, name=name, scorer=scorer.name, **info)
    return results


def table(results: dict[str, dict]) -> str:
    head = "| configuration | edits | EMT | Tox. Prob. | perplexity (judge) | distinct-2 | tokens/s |\n|---|---|---|---|---|---|---|\n"
    rows = [f"| {LABELS[n]} | {r['n_edits']} | {r['emt']:.3f} | {r['tox_prob']:.3f} | {r['perplexity']:.2f} | "
            f"{r['distinct_2']:.3f} | {r['tokens_per_s']:.0f} |" for n, r in results.items()]
    return head + "\n".join(rows) + "\n"


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((axes[0], "tox_prob", "Toxicity Probability"), (axes[1], "emt", "Expected Max. Toxicity")):
        for name, r in results.items():
            ax.scatter(r["perplexity"], r[key], s=60)
            ax.annotate(SHORT[name], (r["perplexity"], r[key]), textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax.margins(x=0.3)
        ax.set_xlabel("perplexity of continuations (unsteered judge)")
        ax.set_ylabel(title)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    first = next(iter(results.values()))
    fig.suptitle(f"{first['model']}: {first['n_prompts']} prompts x {first['samples']} samples, scorer {first['scorer']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=("all", "generate", "score"), default="all")
    parser.add_argument("--out", default="runs/detox", help="folder for the JSONL records (one subfolder per configuration)")
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct (or its converted folder)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--prompt-file", default=None, help="JSONL (RealToxicityPrompts) or text, one prompt a line "
                        "(default: the shipped 400 challenging dev prompts)")
    parser.add_argument("--prompts", type=int, default=None, help="only the first N prompts")
    parser.add_argument("--samples", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per generate call (default 100 on CPU, 500 on GPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default=None, help="spec file to use instead of the shipped preset")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"subset of {','.join(CONFIGS)}")
    parser.add_argument("--scorer", default="profanity-check")
    parser.add_argument("--docs", default=None, help="also write detox_table.md and detox_plot.png into this folder")
    args = parser.parse_args()
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = set(args.configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configuration(s) {sorted(unknown)}: use {', '.join(CONFIGS)}")
    if args.batch_size is None:
        args.batch_size = 500 if (args.device or "").startswith("cuda") else 100
    if args.stage in ("all", "generate"):
        generate(args)
    if args.stage == "generate":
        print(f"generated into {args.out}; score with: python bench/detox.py --stage score --out {args.out}")
        return
    results = score(args)
    if not results:
        sys.exit(f"no runs in {args.out}")
    text = table(results)
    print(text)
    if args.docs:
        docs = Path(args.docs)
        docs.mkdir(parents=True, exist_ok=True)
        first = next(iter(results.values()))
        (docs / "detox_table.md").write_text(
            f"{first['model']}, {first['n_prompts']} prompts x {first['samples']} samples (nucleus p=0.9, 20 tokens, "
            f"seed {first['seed']}), toxicity by {first['scorer']}, perplexity under the unsteered model.\n\n" + text)
        plot(results, docs / "detox_plot.png")
        (docs / "detox_results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    if "none" in results and "preset" in results:
        base, ours = results["none"], results["preset"]
        print(f"RESULT tox_prob_cut={1 - ours['tox_prob'] / base['tox_prob']:.3f} "
              f"emt_cut={1 - ours['emt'] / base['emt']:.3f} ppl_rise={ours['perplexity'] / base['perplexity'] - 1:.3f} "
              f"distinct2_drop={1 - ours['distinct_2'] / base['distinct_2']:.3f}")


if __name__ == "__main__":
    main()
