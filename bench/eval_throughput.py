"""``steer eval`` end to end vs plain batched ``generate`` on the same prompts, side by side.

Both sample the same prompts with the same batching (``batch_size // samples`` prompts x
``samples`` continuations per ``generate`` call, left padded, nucleus p = 0.9, 20 new tokens).
The eval side is the whole protocol: generation, toxicity scoring, perplexity, distinct-n and
the per-batch JSONL commit. Its generation encodes each prompt once and repeats the KV cache for
the samples (``generate_samples``), where plain ``num_return_sequences`` encodes it once per sample. Unsteered, the judge's log-probs are read off ``generate``; steered
(50 value vectors zeroed, both sides steered), the judge needs its own teacher-forced pass. Runs alternate (plain, eval, plain, eval, ...) and the
fastest of each is kept, to damp noise from other work on the machine; process CPU seconds are
shown too (with ``--threads 1`` they hardly move when other jobs share the cores).
Last line: ``RESULT eval_vs_generate=<eval s / plain generate s> ... protocol_overhead=<eval s / its own generation s> ...``
(target <= 1.3).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from steer.evaluation.prompts import load_prompts
from steer.evaluation.protocol import batch_seed, run_eval, sampling_kwargs
from steer.evaluation.toxicity import get_toxicity_scorer
from steer import Adapter, Spec, load_model, steering


def plain_generate(model, tokenizer, prompts, samples, top_p, new_tokens, batch_size, spec=None) -> tuple[float, int]:
    """The baseline: batched generate only. Returns (seconds, generated tokens incl. padding)."""
    per_batch = max(1, batch_size // samples)
    kwargs = dict(sampling_kwargs(tokenizer, top_p, new_tokens), num_return_sequences=samples)
    start, tokens = time.perf_counter(), 0
    for b, s in enumerate(range(0, len(prompts), per_batch)):
        enc = tokenizer(prompts[s:s + per_batch], return_tensors="pt", padding=True).to(model.device)
        torch.manual_seed(batch_seed(0, b))
        with torch.no_grad(), steering(model, spec):
            out = model.generate(**enc, **kwargs)
        tokens += out[:, enc["input_ids"].shape[1]:].numel()
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--device", default=None)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--scorer", default="profanity-check")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model, device=args.device)
    prompts = load_prompts(limit=args.prompts)
    scorer = get_toxicity_scorer(args.scorer, device=args.device)
    settings = dict(samples=args.samples, top_p=0.9, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    plain_generate(model, tokenizer, prompts[:2], args.samples, 0.9, 4, args.batch_size)  # warm-up

    adapter = Adapter(model)
    spec = Spec.build("zero50", [(adapter.n_layers - 1 - i % 10, 37 * i % adapter.d_ff, "scale", 0.0) for i in range(50)],
                      model=model)
    rows, ratios = [], {}
    for label, key, use in (("unsteered", "eval_vs_generate", None), ("steered", "eval_vs_generate_steered", spec)):
        plain, full = [], []

        def run_plain():
            wall, cpu = time.perf_counter(), time.process_time()
            plain_generate(model, tokenizer, prompts, args.samples, 0.9, args.max_new_tokens, args.batch_size, use)
            plain.append((time.perf_counter() - wall, time.process_time() - cpu))

        def run_full():
            with tempfile.TemporaryDirectory() as out:
                wall, cpu = time.perf_counter(), time.process_time()
                summary = run_eval(model, tokenizer, prompts, use, scorer=scorer, out_dir=out, progress=False, **settings)
                full.append((time.perf_counter() - wall, time.process_time() - cpu, summary))

        for r in range(args.reps):  # the order alternates run by run
            for run in (run_plain, run_full)[:: 1 if r % 2 == 0 else -1]:
                run()
        med = statistics.median
        plain_s, plain_cpu = med(p[0] for p in plain), med(p[1] for p in plain)
        eval_s, eval_cpu = med(f[0] for f in full), med(f[1] for f in full)
        gen_s = med(f[2]["gen_seconds"] for f in full)
        rows.append((label, (plain_s, plain_cpu), (eval_s, gen_s), eval_cpu, full[-1][2]))
        ratios[key] = eval_s / plain_s
        ratios[key + "_cpu"] = eval_cpu / plain_cpu
        ratios[key.replace("eval_vs_generate", "protocol_overhead")] = eval_s / gen_s  # eval over its own generation
    n = len(prompts) * args.samples
    print(f"{len(prompts)} prompts x {args.samples} samples, {args.max_new_tokens} new tokens, "
          f"batch {args.batch_size} sequences, {torch.get_num_threads()} threads, medians of {args.reps} (order alternating)")
    print(f"{'':11}{'generate s':>11}{'eval s':>8}{'ratio':>7}{'gen CPU s':>11}{'eval CPU s':>11}{'ratio':>7}"
          f"{'eval: gen s':>12}{'rest s':>8}  EMT / perplexity")
    for label, (plain_s, plain_cpu), (eval_s, gen_s), eval_cpu, summary in rows:
        print(f"{label:11}{plain_s:>11.2f}{eval_s:>8.2f}{eval_s / plain_s:>7.3f}{plain_cpu:>11.2f}{eval_cpu:>11.2f}"
              f"{eval_cpu / plain_cpu:>7.3f}{gen_s:>12.2f}{eval_s - gen_s:>8.2f}"
              f"  {summary['emt']:.3f} / {summary['perplexity']:.2f}")
    print(f"sequences/s (unsteered, wall): generate {n / rows[0][1][0]:.2f}, eval {n / rows[0][2][0]:.2f}; "
          f"scorer {rows[0][4]['scorer']}")
    print("RESULT " + " ".join(f"{k}={v:.3f}" for k, v in ratios.items()))

if __name__ == "__main__":
    main()
