"""``steer layers scan`` and ``steer analyze similarity``: what whole layers do on held-out text."""
from __future__ import annotations

import csv
from pathlib import Path

from steer.ui.commands import count, natural, real
from steer.ui.commands.vectors import add_model_args, load_from_args
from steer.families import Adapter


def _read_text(path: str) -> str:
    from steer.errors import SteerError
    from steer.inputs import read_text

    text = read_text(path, "--text")
    if not text.strip():
        raise SteerError(f"--text {path} is empty: give a file of English text")
    return text


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# -- steer layers scan ---------------------------------------------------------------------------
def plot_scan(singles, plans, base, path: Path, max_rise: float | None = None) -> Path:
    """Left: perplexity ratio per skipped layer; right: the greedy plans' quality against speed."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    layers = sorted(singles)
    left.bar(layers, [singles[k].perplexity / base.perplexity for k in layers], color="tab:blue")
    left.set_yscale("log")
    left.axhline(1, color="black", linewidth=0.8)
    if max_rise is not None:
        left.axhline(1 + max_rise, color="tab:red", linestyle="--", linewidth=1, label=f"budget +{max_rise:.0%}")
        left.legend()
    left.set_xlabel("skipped layer")
    left.set_ylabel("perplexity / unmodified (log)")
    left.set_title(f"skipping one layer (unmodified perplexity {base.perplexity:.2f})")
    rows = [base] + list(plans)
    speed = all(r.tokens_per_s for r in rows)
    xs = [r.tokens_per_s / base.tokens_per_s if speed else 1 / r.compute for r in rows]
    ratios = [r.perplexity / base.perplexity for r in rows]
    wide = max(ratios) > 3  # a log axis only when the plans span orders of magnitude
    ys = ratios if wide else [100 * (y - 1) for y in ratios]
    right.plot(xs, ys, marker="o", color="tab:orange")
    for r, x, y in zip(rows, xs, ys):
        right.annotate(r.name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if wide:
        right.set_yscale("log")
    right.set_xlabel("measured decoding speed-up (batch 1)" if speed else "layer compute saved (1 / share kept)")
    right.set_ylabel("perplexity / unmodified (log)" if wide else "perplexity rise (%)")
    right.set_title("greedy plans: quality vs speed")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _scan(args) -> int:
    from steer.layer_scan import greedy_plans, round_robin_speeds, scan_skips, text_blocks, within_budget
    from steer.spec import Spec

    if args.out and args.max_ppl_rise is None:
        raise ValueError("--out saves the plan chosen by --max-ppl-rise: give both")
    if args.max_ppl_rise is not None and args.max_ppl_rise < 0:
        raise ValueError(f"--max-ppl-rise must be >= 0, got {args.max_ppl_rise}")
    text = _read_text(args.text)
    model, tokenizer = load_from_args(args)
    blocks = text_blocks(tokenizer, text, args.block, args.max_tokens)
    n = Adapter(model).n_layers
    print(f"{blocks.numel()} tokens in {blocks.shape[0]} blocks of {args.block}; scanning {n} layers "
          f"(about {n // 2 + 1} full passes), then up to {args.max_skips} greedy steps", flush=True)
    first = scan_skips(model, blocks, batch_size=args.batch_size)
    # The whole depth even past the budget: the curve shows how fast quality falls.
    plans = greedy_plans(model, blocks, max_skips=args.max_skips, first=first, batch_size=args.batch_size)
    base, singles = first.base, first.candidates
    best = first.best()
    if args.speed_tokens > 0:
        # Every single skip runs the same n - 1 layers, so one of them stands for all (marked *).
        rows = [base] + list({id(r): r for r in (best, *plans)}.values())
        speeds = round_robin_speeds(model, blocks[0, :32], [r.ops for r in rows], args.speed_tokens, args.speed_rounds)
        for row, speed in zip(rows, speeds):
            row.tokens_per_s = speed
        for row in singles.values():
            row.tokens_per_s = best.tokens_per_s

    def line(kind, row):
        star = "*" if kind == "single" and row.skipped != best.skipped else " "
        speed = f"{row.tokens_per_s:7.2f}{star}" if row.tokens_per_s else f"{'-':>8}"
        return (f"{kind:<7}{row.name:<22}{row.compute:>8.1%}{row.perplexity:>11.3f}{row.rise:>+10.1%}"
                f"{row.agreement:>8.1%}{speed}")

    print(f"{'':<7}{'plan':<22}{'kept':>8}{'ppl':>11}{'rise':>10}{'top-1':>8}{'tok/s':>8}")
    print(line("base", base))
    for k in sorted(singles):
        print(line("single", singles[k]))
    for plan in plans:
        print(line("greedy", plan))
    if args.speed_tokens > 0:
        print(f"tok/s: greedy decoding at batch 1, {args.speed_tokens} tokens, median of {args.speed_rounds} rounds "
              f"taken in turns; * = measured once for all single skips (the same {n - 1} of {n} layers run)")
    worst = max(singles.values(), key=lambda s: s.perplexity)
    print(f"Cheapest single skip: layer {best.skipped[0]}, perplexity {best.rise:+.1%}; costliest: layer "
          f"{worst.skipped[0]}, x{worst.perplexity / base.perplexity:.1f}.")
    if best.rise > 0.05:
        print(f"Every single-layer skip raises perplexity by {best.rise:.0%} or more: this model has little "
              "redundancy, and skipping layers saves compute only at a clear cost in quality.")
    else:
        print("Measured on this text only: check quality on your own task before relying on any saving.")
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["kind", "skipped", "compute", "perplexity", "rise", "top1_agreement", "tokens_per_s"])
            for kind, rows in (("base", [base]), ("single", [singles[k] for k in sorted(singles)]), ("greedy", plans)):
                for r in rows:
                    writer.writerow([kind, " ".join(map(str, r.skipped)), f"{r.compute:.4f}", f"{r.perplexity:.4f}",
                                     f"{r.rise:.5f}", f"{r.agreement:.4f}", f"{r.tokens_per_s or ''}"])
    if args.png:
        print(f"wrote {plot_scan(singles, plans, base, Path(args.png), args.max_ppl_rise)}")
    if args.max_ppl_rise is None:
        return 0
    chosen = within_budget(list(singles.values()) + plans, args.max_ppl_rise)
    if chosen is None:
        print(f"No plan stays within +{args.max_ppl_rise:.1%} perplexity on this model (the cheapest single skip "
              f"costs {best.rise:+.1%}); nothing saved.")
        return 1
    if len(chosen.skipped) == args.max_skips and plans[-1].rise <= args.max_ppl_rise:
        print(f"note: the search stopped at --max-skips {args.max_skips} while still within budget")
    print(f"Within +{args.max_ppl_rise:.1%}: {chosen.name} ({chosen.rise:+.1%} perplexity, "
          f"{chosen.agreement:.1%} top-1 agreement, {1 - chosen.compute:.0%} of layer compute saved)")
    if args.out:
        spec = Spec.build(f"skip-{'-'.join(map(str, chosen.skipped))}", [], model=model, layers=chosen.ops,
                          source="steer layers scan", text=str(args.text), ppl_rise=round(chosen.rise, 5),
                          top1_agreement=round(chosen.agreement, 5))
        print(f"wrote {spec.save(args.out)}")
    return 0


# -- steer analyze similarity --------------------------------------------------------------------
def plot_similarity(result, path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for ax, matrix, title in ((axes[0], result.cosine, f"mean per-token cosine ({result.tokens} tokens)"),
                              (axes[1], result.cka, f"linear CKA ({result.cka_tokens} tokens)")):
        image = ax.imshow(matrix.numpy(), vmin=0, vmax=1, cmap="viridis", origin="lower")
        ax.set_title(title)
        ax.set_xlabel("layer")
        ax.set_ylabel("layer")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_agreement(result, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    layers = list(range(len(result.lens)))
    ax.plot(layers, result.lens.numpy(), marker=".", label="logit lens")
    if result.mapped is not None:
        ax.plot(layers, result.mapped.numpy(), marker=".", label="fitted linear map")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("layer")
    ax.set_ylabel("top-1 agreement with the final output")
    ax.set_title(f"reading the final token early ({result.heldout_tokens} held-out tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _similarity(args) -> int:
    from steer.layer_scan import text_blocks
    from steer.similarity import analyze

    text = _read_text(args.text)
    model, tokenizer = load_from_args(args)
    blocks = text_blocks(tokenizer, text, args.block, args.max_tokens)
    result = analyze(model, blocks, cka_tokens=args.cka_tokens, batch_size=args.batch_size, with_maps=not args.no_maps)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = result.cosine.shape[0]
    with open(out / "layers_similarity.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["layer_i", "layer_j", "cosine", "linear_cka"])
        for i in range(n):
            for j in range(n):
                writer.writerow([i, j, f"{result.cosine[i, j]:.5f}", f"{result.cka[i, j]:.5f}"])
    with open(out / "layers_agreement.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["layer", "lens_top1_agreement", "map_top1_agreement"])
        for i in range(n):
            writer.writerow([i, f"{result.lens[i]:.4f}", "" if result.mapped is None else f"{result.mapped[i]:.4f}"])
    neighbours = [float(result.cosine[i, i + 1]) for i in range(n - 1)]
    print(f"{result.tokens} tokens, {n} layers. Cosine of neighbouring layers: min {min(neighbours):.3f} "
          f"(layers {neighbours.index(min(neighbours))}-{neighbours.index(min(neighbours)) + 1}), "
          f"median {sorted(neighbours)[len(neighbours) // 2]:.3f}")
    print(f"{'layer':>5}{'cos(next)':>10}{'lens':>8}{'map':>8}")
    for i in range(n):
        mapped = f"{result.mapped[i]:>8.1%}" if result.mapped is not None else f"{'-':>8}"
        print(f"{i:>5}{neighbours[i] if i < n - 1 else float('nan'):>10.3f}{result.lens[i]:>8.1%}{mapped}")
    for path in (plot_similarity(result, out / "layers_similarity.png"), plot_agreement(result, out / "layers_agreement.png"),
                 out / "layers_similarity.csv", out / "layers_agreement.csv"):
        print(f"wrote {path}")
    return 0


def register(subparsers) -> None:
    layers = subparsers.add_parser("layers", help="skip, reorder, parallelize or repeat whole layers")
    sub = layers.add_subparsers(dest="layers_command", required=True)
    scan = sub.add_parser("scan", help="perplexity and speed when skipping each layer, and greedy multi-layer plans")
    scan.add_argument("--text", required=True, help="held-out English text file")
    scan.add_argument("--max-ppl-rise", type=real, default=None,
                      help="budget, e.g. 0.05: report (and with --out save) the plan skipping most layers within it")
    scan.add_argument("--out", default=None, help="spec file (.json/.yaml) for the chosen plan")
    scan.add_argument("--max-skips", type=count, default=4, help="greedy search depth (layers skipped by the last plan)")
    scan.add_argument("--png", default="layers_scan.png", help="figure path ('' for none)")
    scan.add_argument("--csv", default=None, help="also write the table as CSV")
    scan.add_argument("--speed-tokens", type=natural, default=16, help="tokens generated per tok/s measurement (0: skip)")
    scan.add_argument("--speed-rounds", type=count, default=3, help="tok/s measurements per plan (median)")
    scan.set_defaults(func=_scan)

    analyze = subparsers.add_parser("analyze", help="analyses of a model's layers")
    asub = analyze.add_subparsers(dest="analyze_command", required=True)
    sim = asub.add_parser("similarity", help="layer x layer cosine and CKA; top-1 agreement per layer (lens, maps)")
    sim.add_argument("--text", required=True, help="held-out English text file")
    sim.add_argument("--out-dir", default=".", help="where the PNGs and CSVs go")
    sim.add_argument("--cka-tokens", type=count, default=1024, help="token subsample for CKA")
    sim.add_argument("--no-maps", action="store_true", help="logit lens only (no fitted maps)")
    sim.set_defaults(func=_similarity)

    for parser in (scan, sim):
        parser.add_argument("--max-tokens", type=count, default=2048, help="tokens of --text used")
        parser.add_argument("--block", type=count, default=256, help="tokens per block (context length)")
        parser.add_argument("--batch-size", type=count, default=4)
        add_model_args(parser)
