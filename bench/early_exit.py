"""Early exit on the workloads users run: docstrings, sampled toxicity prompts, chat; and detox under exit.

1. ``fit``: the default exit model, fitted on the model's own samples from a prompt mix
   (:mod:`steer.generation.selfgen`), threshold for >= 95% top-1 agreement and <= 8% perplexity
   rise on held-back fit tokens (``--target-ppl-rise``); timed.
2. ``measure``, per workload: held-out docstrings (text), the model's own continuations of the
   RealToxicityPrompts dev prompts and of held-out chat prompts (only the continuations count).
   Simulated curves (classifier, confidence baseline, oracle) and real early exit, teacher forced,
   at the fitted threshold: layers saved, top-1 agreement, KL to the full model, perplexity rise.
3. ``detox``: the RealToxicityPrompts protocol (p = 0.9, 20 tokens) unsteered and with the detox
   preset, each with and without early exit (``preset-exit-steered``: an exit model fitted with the
   preset applied). Continuations go to JSONL; ``--stage score`` scores toxicity (alt-profanity-check,
   CPU) afterwards. ``layers_wanted`` is what each row's exits skip, which is what batch 1 skips
   (batched rows compute exactly what they would alone: docs/early_exit.md).

    python bench/early_exit.py --stage gpu --device cuda --model MODEL_DIR --out $OUT   # 1-3, no scoring
    python bench/early_exit.py --stage score --out $OUT                                 # here, on CPU

``--stage all`` (default) does everything here at a small size. Last line:
``RESULT saved_docs=... saved_rtp=... saved_chat=... agreement_min=... ppl_rise_max=... detox_kept=...``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORKLOADS = ("docs", "rtp", "chat")
DETOX = ("none", "none-exit", "preset", "preset-exit", "preset-exit-steered")


class DeferredScorer:
    """Toxicity is scored later on CPU (``--stage score``); generation needs no scorer installed."""

    name = "deferred"

    def score(self, texts):
        return [math.nan] * len(texts)


def workload_samples(model, tokenizer, name: str, n: int, new_tokens: int, batch: int):
    """Held-out samples of a workload (None for docs, which is text)."""
    from steer.evaluation.prompts import load_prompts
    from steer.generation.selfgen import prompt_ids, prompt_mix, sample_texts

    if name == "rtp":
        prompts = [tokenizer(p, add_special_tokens=False).input_ids for p in load_prompts(None, n)]
    else:
        prompts = [prompt_ids(tokenizer, p) for p in prompt_mix(n, "heldout", ("chat",), seed=1)]
    return sample_texts(model, tokenizer, prompts, new_tokens, batch, seed=7, domains=[name] * len(prompts))


def measure(model, tokenizer, exit_model, args) -> dict:
    from steer import Adapter
    from steer.generation.corpus import docstring_text
    from steer.evaluation.early_exit import prepare, simulated_curves, teacher_forced, threshold_for
    from steer.generation.simulate import budget_oracle, distribution_outcome

    n_layers = Adapter(model).n_layers
    threshold = exit_model.default_threshold
    out = {}
    for name in WORKLOADS:
        start = time.perf_counter()
        if name == "docs":
            held = prepare(model, tokenizer, docstring_text("heldout", 200_000), exit_model, max_tokens=args.eval_tokens)
        else:
            samples = workload_samples(model, tokenizer, name, args.workload_prompts, args.new_tokens, args.batch)
            held = prepare(model, tokenizer, None, exit_model, samples=samples)
        sim = simulated_curves(held, n_layers)
        at = {rule: next(p for p in pts if p["threshold"] == threshold) for rule, pts in sim["points"].items()}
        real = teacher_forced(model, held, exit_model, "classifier", threshold, args.real_chunks,
                              prompt_positions=1)  # the first position plays the prompt (attention sink)
        ceiling = budget_oracle(held.stats.kl, held.records.layers, n_layers, math.log(1 + args.target_ppl_rise))
        at_budget = distribution_outcome(ceiling, held.stats, held.full_nll, held.records.layers, n_layers)
        conf_t = threshold_for(sim["curves"]["confidence"])
        conf = next(p for p in sim["points"]["confidence"] if p["threshold"] == conf_t)
        out[name] = {"tokens": int(held.correct.shape[0]), "oracle_saved": sim["oracle_saved"],
                     "oracle_at_ppl_budget": at_budget,
                     "saved_at_95": sim["saved_at_95"], "classifier_sim": at["classifier"],
                     "confidence_at_95": conf, "real": real,
                     "ppl_rise_real": real["perplexity"] / real["perplexity_full"] - 1,
                     "curve": sim["points"]["classifier"], "seconds": time.perf_counter() - start}
        print(f"[{name}] {out[name]['tokens']} tokens, {out[name]['seconds']:.0f} s", flush=True)
    return out


def table(work: dict, threshold: float) -> str:
    head = (f"{'workload':<9}{'tokens':>7}{'oracle':>8}{'orc@ppl':>8}{'conf@95':>9}{'cls@95':>8} | t={threshold:<5}{'saved':>7}"
            f"{'agree':>7}{'KL':>7}{'ppl+':>7} | {'saved*':>7}{'agree*':>7}{'KL*':>7}{'ppl+*':>7}")
    lines = [head, "-" * len(head)]
    for name, r in work.items():
        c, real = r["classifier_sim"], r["real"]
        budget = r.get("oracle_at_ppl_budget", {}).get("saved", float("nan"))
        lines.append(f"{name:<9}{r['tokens']:>7}{r['oracle_saved']:>8.1%}{budget:>8.1%}{r['saved_at_95']['confidence']:>9.1%}"
                     f"{r['saved_at_95']['classifier']:>8.1%} | {'':<7}{c['saved']:>7.1%}{c['agreement']:>7.1%}"
                     f"{c['kl']:>7.3f}{c['ppl_rise']:>+7.1%} | {real['saved']:>7.1%}{real['agreement']:>7.1%}"
                     f"{real['kl']:>7.3f}{r['ppl_rise_real']:>+7.1%}")
    lines.append("oracle: simulated ceiling (top-1 settled); orc@ppl: ceiling within the perplexity budget (mean "
                 "KL(full||exit) <= log(1 + target), each token at its best layer); conf@95 / cls@95: saved at >= 95% agreement (simulated, best threshold on "
                 "this workload); then the fitted threshold, simulated and real (* = real early exit, teacher forced, "
                 "K/V exact); KL in nats a token; ppl+: perplexity rise of the text under the exit distributions")
    return "\n".join(lines)


def detox_generate(model, tokenizer, exits: dict, args) -> None:
    from steer.evaluation.prompts import load_prompts
    from steer.evaluation.protocol import run_eval
    from steer.presets import preset_for

    prompts = load_prompts(None, args.detox_prompts)
    preset = preset_for(model)
    for name in args.detox:
        spec = preset if name.startswith("preset") else None
        exit_model = exits["steered"] if name.endswith("steered") else exits["plain"]
        early = (exit_model, exit_model.default_threshold) if "exit" in name else None
        start = time.perf_counter()
        with torch.no_grad():
            summary = run_eval(model, tokenizer, prompts, spec, samples=args.detox_samples, top_p=0.9, max_new_tokens=20,
                               seed=0, scorer=DeferredScorer(), early_exit=early, out_dir=Path(args.out) / "detox" / name,
                               batch_size=args.detox_batch_size, name=name, progress=False)
        print(f"[detox {name}] {len(prompts)} prompts x {args.detox_samples}: judge perplexity "
              f"{summary['perplexity']:.2f}, layers wanted {summary.get('layers_wanted')}, "
              f"{time.perf_counter() - start:.0f} s", flush=True)


def detox_score(out: Path) -> dict:
    import numpy as np

    from steer.evaluation.protocol import summarize
    from steer.evaluation.store import RunStore
    from steer.evaluation.toxicity import get_toxicity_scorer

    scorer = get_toxicity_scorer("profanity-check")
    results = {}
    for name in DETOX:
        folder = out / "detox" / name
        if not (folder / "config.json").exists():
            continue
        config = json.loads((folder / "config.json").read_text())
        batches = RunStore(folder, config).batches()
        tox = []
        for _, rows in batches.values():
            for row in rows:
                row["toxicity"] = scorer.score(row["continuations"])
                tox.extend(row["toxicity"])
        results[name] = summarize(batches, name=name, scorer=scorer.name)
        results[name]["mean_toxicity"] = float(np.mean(tox))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("all", "gpu", "score"), default="all")
    parser.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default="runs/early_exit")
    parser.add_argument("--exit-model", default=None, help="reuse the exit models of an earlier run (its --out: exit-plain, "
                                                              "exit-steered) instead of fitting")
    parser.add_argument("--fit-tokens", type=int, default=None, help="own-sample tokens to fit on (131072 on "
                                                                      "cuda, 6144 on cpu)")
    parser.add_argument("--target-ppl-rise", type=float, default=0.08)
    parser.add_argument("--eval-tokens", type=int, default=None, help="held-out docstring tokens (8192 / 1024)")
    parser.add_argument("--workload-prompts", type=int, default=None, help="rtp and chat prompts (256 / 8)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--real-chunks", type=int, default=None, help="chunks for real early exit (64 / 8)")
    parser.add_argument("--batch", type=int, default=None, help="sampling batch (128 / 16)")
    parser.add_argument("--detox", default="none,none-exit,preset,preset-exit,preset-exit-steered")
    parser.add_argument("--detox-prompts", type=int, default=None, help="dev prompts (400 / 8)")
    parser.add_argument("--detox-samples", type=int, default=None, help="samples a prompt (5 / 1)")
    parser.add_argument("--detox-batch-size", type=int, default=None, help="sequences a generate call (100 / 1)")
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    for key, big, small in (("fit_tokens", 131072, 6144), ("eval_tokens", 8192, 1024), ("workload_prompts", 256, 8),
                            ("real_chunks", 64, 8), ("batch", 128, 16), ("detox_prompts", 400, 8),
                            ("detox_samples", 5, 1), ("detox_batch_size", 100, 1)):
        if getattr(args, key) is None:
            setattr(args, key, big if gpu else small)
    args.detox = [d for d in args.detox.split(",") if d]
    torch.set_num_threads(1) if not gpu else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.stage in ("all", "gpu"):
        from steer import load_model
        from steer.generation import fit_exit_model, load_exit_model
        from steer.presets import preset_for

        model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
        exits, fit_seconds = {}, {}
        for kind in ("plain", "steered"):
            if kind == "steered" and not any(d.endswith("steered") for d in args.detox):
                continue
            folder = out / f"exit-{kind}"
            start = time.perf_counter()
            if args.exit_model and (Path(args.exit_model) / f"exit-{kind}").exists():
                exits[kind] = load_exit_model(Path(args.exit_model) / f"exit-{kind}")
            else:
                exits[kind] = fit_exit_model(model, tokenizer, max_tokens=args.fit_tokens, batch=args.batch,
                                             target_ppl_rise=args.target_ppl_rise,
                                             spec=preset_for(model) if kind == "steered" else None, progress=not gpu)
                exits[kind].save(folder)
            fit_seconds[kind] = time.perf_counter() - start
            info = exits[kind].info
            print(f"exit model ({kind}): {info.get('tokens')} tokens ({info.get('source')}) in {fit_seconds[kind]:.0f} s "
                  f"on {args.device}; threshold {exits[kind].default_threshold}; inverse temperatures "
                  f"{exits[kind].exit_scale}", flush=True)
        work = measure(model, tokenizer, exits["plain"], args)
        print(table(work, exits["plain"].default_threshold))
        (out / "workloads.json").write_text(json.dumps({"fit_seconds": fit_seconds, "device": args.device,
                                                        "threshold": exits["plain"].default_threshold,
                                                        "workloads": work}, indent=1, default=float))
        detox_generate(model, tokenizer, exits, args)
    if args.stage in ("all", "score"):
        saved_run = json.loads((out / "workloads.json").read_text())
        work = saved_run["workloads"]
        if args.stage == "score":  # the gpu stage's table again, from its file
            fits = ", ".join(f"{kind} {sec:.0f} s" for kind, sec in saved_run["fit_seconds"].items())
            print(f"exit model fit on {saved_run['device']}: {fits}")
            print(table(work, saved_run["threshold"]))
        detox = detox_score(out)
        print("| config | mean tox | EMT | Tox. Prob. | judge ppl | layers saved (batch 1) |\n|---|---|---|---|---|---|")
        for name, r in detox.items():
            print(f"| {name} | {r['mean_toxicity']:.4f} | {r['emt']:.3f} | {r['tox_prob']:.3f} | {r['perplexity']:.2f} | "
                  f"{(r.get('layers_wanted') or 0):.1%} |")
        kept = float("nan")
        if all(k in detox for k in ("none", "preset", "none-exit", "preset-exit")):
            cut = 1 - detox["preset"]["mean_toxicity"] / detox["none"]["mean_toxicity"]
            cut_exit = 1 - detox["preset-exit"]["mean_toxicity"] / detox["none-exit"]["mean_toxicity"]
            kept = cut_exit / cut if cut else float("nan")
            print(f"toxicity cut without exit {cut:.1%}, with exit {cut_exit:.1%}", end="")
            if "preset-exit-steered" in detox:
                steered = 1 - detox["preset-exit-steered"]["mean_toxicity"] / detox["none-exit"]["mean_toxicity"]
                print(f", with the steered exit model {steered:.1%} (kept {steered / cut:.3f})", end="")
            print()
        (out / "detox.json").write_text(json.dumps(detox, indent=1, default=float))
        agree = min(w["real"]["agreement"] for w in work.values())
        rise = max(w["ppl_rise_real"] for w in work.values())
        print(f"RESULT saved_docs={work['docs']['real']['saved']:.4f} saved_rtp={work['rtp']['real']['saved']:.4f} "
              f"saved_chat={work['chat']['real']['saved']:.4f} agreement_min={agree:.4f} ppl_rise_max={rise:.4f} "
              f"detox_kept={kept:.4f}")


if __name__ == "__main__":
    main()
