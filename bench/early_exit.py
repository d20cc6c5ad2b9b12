"""Early exit on the embedded model, side by side in one run: ours, the confidence baseline, the oracle.

    python bench/early_exit.py                 # CPU; fits the exit model once (cached), then measures
    python bench/early_exit.py --device cuda

Fit: Python's docstrings, "fit" split. Measured on the "heldout" split (other stdlib modules):
* simulated curves (teacher forced) for the classifier and the confidence baseline, and the
  oracle; ``baseline_saved`` is the baseline's saving at >= 95% agreement on that curve;
* our rule at the threshold the fit chose for 95% agreement on the fit text (no tuning on the
  held-out text): real early exit, teacher forced (compute really skipped, agreement, perplexity);
* tokens/s of greedy batch-1 generation against plain ``generate`` (interleaved, medians) and a
  batch of all prompts (compute really skipped vs what the rows wanted).

Last line: ``RESULT saved=... agreement=... speedup=... oracle_saved=... baseline_saved=...``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from steer.generation import fit_exit_model, load_exit_model  # noqa: E402
from steer.generation.corpus import docstring_text  # noqa: E402
from steer.generation.evaluate import (batch_run, generation_runs, held_prompts, prepare, simulated_curves,  # noqa: E402
                                 teacher_forced, threshold_for)
from steer.generation.exit_model import fingerprint  # noqa: E402
from steer import Adapter, load_model  # noqa: E402
from steer.models import cache_dir  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--exit-model", default=None, help="exit model folder (default: fit once, cached)")
    parser.add_argument("--fit-tokens", type=int, default=131072)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--real-chunks", type=int, default=64, help="128-token chunks for the real teacher-forced run")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--study", action="store_true", help="also compare the K/V schemes and time forced exits "
                                                             "(docs/early_exit.md; a few more minutes)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, tokenizer = load_model(device=args.device)
    n_layers = Adapter(model).n_layers

    if args.exit_model:
        exit_model = load_exit_model(args.exit_model)
    else:
        folder = cache_dir() / "exit" / f"{fingerprint(model)}-docstrings-{args.fit_tokens}"
        if (folder / "exit_model.json").exists():
            exit_model = load_exit_model(folder)
            print(f"exit model: cached at {folder}")
        else:
            print(f"fitting the exit model on {args.fit_tokens} tokens of docstrings (once; cached at {folder}) ...")
            exit_model = fit_exit_model(model, tokenizer, docstring_text("fit", 2_000_000), max_tokens=args.fit_tokens,
                                        progress=True)
            exit_model.save(folder)
    threshold = exit_model.default_threshold
    print(f"check layers {exit_model.check_layers}, threshold {threshold} (chosen on the fit text for 95% agreement)")

    held = prepare(model, tokenizer, docstring_text("heldout", 60_000), exit_model, max_tokens=args.eval_tokens)
    sim = simulated_curves(held, n_layers)
    curves = sim["curves"]
    ours_sim = {t: (s, a) for t, s, a in curves["classifier"]}.get(threshold)
    baseline_t = threshold_for(curves["confidence"])
    print(f"simulated on {held.records.top1.shape[0]} held-out tokens: oracle saves {sim['oracle_saved']:.1%}; "
          f"at >=95% agreement classifier {sim['saved_at_95']['classifier']:.1%}, "
          f"confidence baseline {sim['saved_at_95']['confidence']:.1%} (t={baseline_t})")
    if ours_sim:
        print(f"classifier at t={threshold}: simulated saved {ours_sim[0]:.1%}, agreement {ours_sim[1]:.1%}")

    real = teacher_forced(model, held, exit_model, "classifier", threshold, args.real_chunks)
    print(f"real early exit, teacher forced ({real['tokens']} tokens): saved {real['saved']:.1%}, agreement "
          f"{real['agreement']:.1%}, perplexity {real['perplexity']:.2f} vs {real['perplexity_full']:.2f}")

    prompts = held_prompts(held, args.prompts)
    gen = generation_runs(model, prompts, exit_model, [("classifier", threshold), ("confidence", baseline_t)],
                          args.new_tokens, args.repeats)
    ours, base = gen[("classifier", threshold)], gen[("confidence", baseline_t)]
    print(f"batch 1, {args.prompts} prompts x {args.new_tokens} tokens x {args.repeats}: plain "
          f"{gen['plain_tokens_per_s']:.2f} tok/s; classifier {ours['tokens_per_s']:.2f} tok/s "
          f"(x{ours['speedup']:.3f} wall, x{ours['cpu_speedup']:.3f} CPU time, saved {ours['saved']:.1%}, greedy "
          f"identical {ours['greedy_exact']:.0%}); confidence baseline x{base['speedup']:.3f} wall "
          f"(saved {base['saved']:.1%}, greedy identical {base['greedy_exact']:.0%})")
    batch = batch_run(model, prompts, exit_model, "classifier", threshold, args.new_tokens, max(1, args.repeats - 1))
    print(f"batch of {batch['batch']}: rows wanted {batch['wanted']:.1%} saved, really skipped {batch['saved']:.1%} "
          f"(rows frozen until the last exits), x{batch['speedup']:.3f} wall vs plain batched generate")
    if args.study:
        from steer.generation.evaluate import propagation_study, step_costs

        study = propagation_study(model, held, exit_model, threshold, args.real_chunks)
        for scheme, r in study.items():
            extra = f", perplexity {r['perplexity']:.2f}" if "perplexity" in r else ""
            print(f"K/V scheme {scheme:<9}: saved {r['saved']:.1%}, agreement {r['agreement']:.1%}{extra}")
        layers = [exit_model.check_layers[0], exit_model.check_layers[len(exit_model.check_layers) // 2],
                  exit_model.check_layers[-1]]
        for scheme in ("defer", "hidden"):
            costs = step_costs(model, tokenizer, exit_model, layers, propagate=scheme)
            print(f"CPU ms per decode step, forced exit ({scheme}): plain {costs['plain'] * 1e3:.1f}; " + ", ".join(
                f"after layer {layer} ({n_layers - 1 - layer} skipped) {costs[layer] * 1e3:.1f}" for layer in layers))
    print(f"total {time.perf_counter() - start:.0f} s on {args.device}")
    print(f"RESULT saved={real['saved']:.4f} agreement={real['agreement']:.4f} speedup={ours['speedup']:.4f} "
          f"oracle_saved={sim['oracle_saved']:.4f} baseline_saved={sim['saved_at_95']['confidence']:.4f}")


if __name__ == "__main__":
    main()
