"""Concept steering side by side: FFN value vectors (our builder; ranking only) against logit bias,
activation addition and prompting, on sentiment (toward positive, toward negative) and topics.

Protocol (PPLM / GeDi / DExperts): the evaluation half of the shipped neutral prompts
(``steer.evaluation.prompts.neutral_prompts("evaluation")``), nucleus p = 0.9, 20 new tokens, the
same prompts, seeds and samples for every method; every method swept over its strength; success
judged by VADER (sentiment) or by a topic *judge* word list disjoint from the steering list;
perplexity of each continuation given its plain prompt under the unsteered model. Everything a
method chooses (the builder's vectors and count, activation addition's layer) is chosen on the
selection half only. Also: composition (detox preset down + positive up in one ``generate``) on
toxicity prompts, judged for toxicity and sentiment.

    python bench/concepts.py                                    # small CPU run, both tasks, then docs
    python bench/concepts.py --device cuda --task sentiment --stage generate --out runs/concepts
    python bench/concepts.py --device cuda --task topic --stage generate --out runs/concepts
    python bench/concepts.py --stage score --out runs/concepts --docs docs   # here: judges + tables + plots

Last line: ``RESULT sent_pos_ffn=... sent_pos_best_baseline=... sent_neg_ffn=... sent_neg_best_baseline=...
topic_ffn=... topic_best_baseline=...``, each the best success at <= 10% judge-perplexity rise (and
distinct-2 at most 10% below unsteered: repetitive text has a low perplexity too).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BASELINES = ("prompting", "logit-bias", "act-add", "ffn-ranking")
OURS = "ffn-built"
FAMILIES = ("none",) + BASELINES + (OURS,)
INSTRUCTIONS = {  # prompting strengths: ever more insistent instructions
    1: "Continue the text in a {tone} tone.",
    2: "Continue the text. Make it sound clearly {tone}.",
    3: "Continue the text. It must be very {tone}: use strongly {tone} words.",
}
TOPIC_INSTRUCTIONS = {
    1: "Continue the text; it is about {topic}.",
    2: "Continue the text and make it about {topic}.",
    3: "Continue the text. It must be clearly about {topic}: mention {topic} things.",
}
TONE = {"positive": "positive", "negative": "negative"}
RANKING_TOP, RANKING_VALUE = 20, 3.0  # Geva et al. 2022: top vectors set to 3


@dataclass
class Size:
    eval_prompts: int | None
    samples: int
    batch_size: int
    build: dict
    actadd_layers: tuple
    actadd_alphas_select: tuple
    actadd_select_prompts: int
    strengths: dict
    topics: tuple
    compose_prompts: int


FULL = Size(eval_prompts=None, samples=5, batch_size=500,
            build=dict(prompt_limit=None, samples=4, counts=(5, 10, 20, 40, 80), lams=(4.0, 16.0),
                       forced_per_prompt=6, mid_sample=1, batch_size=64),
            actadd_layers=tuple(range(2, 29, 4)), actadd_alphas_select=(0.1, 0.2, 0.4), actadd_select_prompts=40,
            # fine near each method's +10% perplexity edge (the previous full run's), so no method loses by its grid
            strengths={"prompting": (1, 2, 3), "logit-bias": (1, 2, 3, 3.5, 4, 4.5, 5, 6),
                       "act-add": (0.05, 0.1, 0.2, 0.3, 0.5, 0.6, 0.75, 1),
                       "ffn-ranking": (0.1, 0.25, 0.35, 0.45, 0.5, 0.6, 0.75, 1),
                       "ffn-built": (0.5, 1, 1.5, 2, 2.25, 2.5, 2.75, 3, 4)},
            topics=("computers", "food", "politics", "science", "sports"), compose_prompts=100)
CPU = Size(eval_prompts=10, samples=2, batch_size=40,
           build=dict(prompt_limit=24, samples=2, counts=(5, 10, 20), lams=(4.0, 16.0), forced_per_prompt=3,
                      mid_sample=1, batch_size=16),
           actadd_layers=(6, 12, 18), actadd_alphas_select=(0.2, 0.4), actadd_select_prompts=6,
           strengths={"prompting": (1, 3), "logit-bias": (2, 4), "act-add": (0.2, 0.4), "ffn-ranking": (0.25, 0.5),
                      "ffn-built": (1, 2, 4)},
           topics=("food",), compose_prompts=6)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def slug(concept: str) -> str:
    return concept.replace(":", "-")


def concepts_of(task: str, size: Size) -> list[str]:
    return ["positive", "negative"] if task == "sentiment" else [f"topic:{t}" for t in size.topics]


def anti_words(concept: str) -> list[str]:
    from steer.concepts import builtin_words, topics

    if concept in ("positive", "negative"):
        return builtin_words("negative" if concept == "positive" else "positive")
    return [w for name, t in topics().items() if name != concept[6:] for w in t["steer"]]


# -- build: everything chosen on selection prompts -------------------------------------------------
def build_ffn(model, tokenizer, concept: str, size: Size, out: Path):
    from steer import Spec
    from steer.build import build_concept_spec

    path = out / "specs" / f"{slug(concept)}.json"
    if path.exists():
        return Spec.load(path).validate(model)
    start = time.perf_counter()
    spec = build_concept_spec(model, tokenizer, concept, "up", work_dir=out / "work", progress=lambda m: log(f"  {m}"),
                              **size.build)
    spec.meta["build_seconds"] = round(time.perf_counter() - start, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    spec.save(path)
    return spec


def ranking_spec(model, tokenizer, concept: str):
    from steer import Concept, Spec, rank_vectors

    rows = rank_vectors(model, tokenizer, Concept.resolve(concept, tokenizer), top=RANKING_TOP)
    return Spec.build(f"{slug(concept)}-ranking", [(str(r.name), "set", RANKING_VALUE) for r in rows], model=model,
                      ranking="steer.rank_vectors: mean z-score of the concept's tokens in the vocabulary projection")


def choose_actadd(model, tokenizer, concept: str, size: Size, out: Path) -> dict:
    """Layer of activation addition: best concept-word share at <= 10% perplexity rise on selection prompts."""
    import torch

    from steer import Concept
    from steer.baselines import ActAddProcessor, mean_difference
    from steer.evaluation.prompts import neutral_prompts
    from steer.evaluation.steer_eval import Method, generate_records

    path = out / "actadd" / f"{slug(concept)}.json"
    if path.exists():
        data = json.loads(path.read_text())
        data["vector"] = torch.tensor(data["vector"])
        return data
    selection = neutral_prompts("selection")
    rng = random.Random(0)
    words, anti = Concept.resolve(concept, tokenizer).words, anti_words(concept)
    vectors = mean_difference(model, tokenizer, [f"{p} {rng.choice(words)}" for p in selection],
                              [f"{p} {rng.choice(anti)}" for p in selection], size.actadd_layers)
    prompts = selection[::max(1, len(selection) // size.actadd_select_prompts)][:size.actadd_select_prompts]
    steer_words = {w.lower() for w in words}

    def run(method):
        rows = generate_records(model, tokenizer, prompts, method, samples=2, seed=1, batch_size=size.batch_size)
        texts = [c for r in rows for c in r["continuations"]]
        share = sum(any(w.strip(".,;:!?\"'").lower() in steer_words for w in t.split()) for t in texts) / len(texts)
        ppl = [p for r in rows for p in r["perplexity"] if math.isfinite(p)]
        return share, sum(ppl) / len(ppl)

    _, base = run(Method("none"))
    trials = []
    for layer in size.actadd_layers:
        for alpha in size.actadd_alphas_select:
            share, ppl = run(Method("act-add", alpha, processors=(ActAddProcessor(model, layer, vectors[layer], alpha),)))
            trials.append(dict(layer=layer, alpha=alpha, share=share, ppl_rise=ppl / base - 1))
            log(f"  act-add {concept} layer {layer} alpha {alpha:g}: concept words {share:.2f}, ppl {ppl / base - 1:+.1%}")
    fits = [t for t in trials if t["ppl_rise"] <= 0.10] or [min(trials, key=lambda t: t["ppl_rise"])]
    best = max(fits, key=lambda t: (t["share"], -t["ppl_rise"]))
    data = dict(layer=best["layer"], trials=trials, vector=vectors[best["layer"]].tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    data["vector"] = vectors[best["layer"]]
    return data


def methods_for(model, tokenizer, concept: str, size: Size, out: Path) -> list:
    from steer import Concept, SteeringProcessor
    from steer.baselines import ActAddProcessor, LogitBiasProcessor
    from steer.evaluation.steer_eval import Method

    log(f"{concept}: building the FFN spec on selection prompts")
    built = build_ffn(model, tokenizer, concept, size, out)
    log(f"{concept}: {len(built.edits)} edits; choosing the activation-addition layer on selection prompts")
    actadd = choose_actadd(model, tokenizer, concept, size, out)
    ranking = ranking_spec(model, tokenizer, concept)
    tokens = Concept.resolve(concept, tokenizer).token_ids
    table = TOPIC_INSTRUCTIONS if concept.startswith("topic:") else INSTRUCTIONS
    fill = dict(tone=TONE.get(concept, ""), topic=concept[6:])
    methods = []
    for s in size.strengths["prompting"]:
        methods.append(Method("prompting", s, instruction=table[s].format(**fill)))
    for s in size.strengths["logit-bias"]:
        methods.append(Method("logit-bias", s, processors=(LogitBiasProcessor(tokens, s),)))
    for s in size.strengths["act-add"]:
        methods.append(Method("act-add", s, processors=(ActAddProcessor(model, actadd["layer"], actadd["vector"], s),),
                              info=dict(layer=actadd["layer"])))
    for s in size.strengths["ffn-ranking"]:
        methods.append(Method("ffn-ranking", s, processors=(SteeringProcessor(model, ranking.scaled(s)),)))
    for s in size.strengths["ffn-built"]:
        methods.append(Method("ffn-built", s, processors=(SteeringProcessor(model, built.scaled(s)),)))
    return methods


# -- generate ----------------------------------------------------------------------------------------
def generate(args, size: Size) -> None:
    import torch

    from steer import SteeringProcessor, load_model
    from steer.evaluation.prompts import load_prompts, neutral_prompts
    from steer.evaluation.steer_eval import Method, generate_records, save_run
    from steer.presets import preset_for

    if args.device in (None, "cpu"):
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, device=args.device)
    prompts = neutral_prompts("evaluation")[:size.eval_prompts]
    out = Path(args.out)
    settings = dict(samples=size.samples, seed=args.seed, batch_size=size.batch_size)

    def run(path: Path, method: Method, prompt_list, **meta) -> None:
        if path.exists():
            return
        start = time.perf_counter()
        rows = generate_records(model, tokenizer, prompt_list, method, **settings)
        save_run(path, dict(method=method.family, strength=method.strength, instruction=method.instruction,
                            seconds=round(time.perf_counter() - start, 2), **method.info, **meta, **settings), rows)
        log(f"  {path.relative_to(out)} ({time.perf_counter() - start:.1f}s)")

    for task in args.tasks:
        log(f"== {task}: {len(prompts)} evaluation prompts x {size.samples}")
        run(out / task / "none.jsonl", Method("none"), prompts)
        for concept in concepts_of(task, size):
            for method in methods_for(model, tokenizer, concept, size, out):
                run(out / task / slug(concept) / f"{method.label}.jsonl", method, prompts, concept=concept)
        if task == "sentiment":  # composition: detox down + positive up in one generate, on toxicity prompts
            from steer import Spec

            rtp = load_prompts(None, size.compose_prompts)
            detox = preset_for(model)
            positive = Spec.load(out / "specs" / "positive.json").validate(model)
            for name, procs in (("none", ()), ("detox", (SteeringProcessor(model, detox),)),
                                ("positive", (SteeringProcessor(model, positive),)),
                                ("detox+positive", (SteeringProcessor(model, detox), SteeringProcessor(model, positive)))):
                run(out / "compose" / f"{name}.jsonl", Method(name, 1.0, processors=procs), rtp)


# -- score -------------------------------------------------------------------------------------------
def judge_for(concept: str):
    if concept.startswith("topic:"):
        from steer.evaluation.topic import TopicJudge

        return TopicJudge(concept[6:])
    from steer.evaluation.sentiment import VaderScorer

    return VaderScorer(concept)


def score_task(out: Path, task: str) -> dict[str, list[dict]]:
    from steer.evaluation.steer_eval import load_run, summarize_records

    folder = out / task
    if not (folder / "none.jsonl").exists():
        return {}
    _, base_rows = load_run(folder / "none.jsonl")
    results = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        runs = [load_run(p) for p in sorted(sub.glob("*.jsonl"))]
        if not runs:
            continue
        concept = runs[0][0]["concept"]
        judge = judge_for(concept)
        summaries = [dict(summarize_records(base_rows, judge), method="none", strength=0.0)]
        for meta, rows in runs:
            summaries.append(dict(summarize_records(rows, judge), method=meta["method"], strength=meta["strength"],
                                  layer=meta.get("layer"), instruction=meta.get("instruction")))
        order = {f: i for i, f in enumerate(FAMILIES)}
        summaries.sort(key=lambda s: (order.get(s["method"], 99), s["strength"]))
        results[concept] = summaries
    return results


def best_by_family(summaries: list[dict]) -> dict[str, dict | None]:
    from steer.evaluation.steer_eval import best_within

    base, distinct = summaries[0]["perplexity"], summaries[0]["distinct_2"]
    return {f: best_within([s for s in summaries if s["method"] == f], base, base_distinct=distinct) for f in FAMILIES}


def plot(results: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.8), squeeze=False)
    colors = dict(zip(FAMILIES, ("black", "tab:purple", "tab:orange", "tab:green", "tab:gray", "tab:red")))
    for ax, (concept, summaries) in zip(axes[0], results.items()):
        base = summaries[0]["perplexity"]
        for family in FAMILIES:
            pts = sorted((s["perplexity"], s["success"]) for s in summaries if s["method"] == family)
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=4, color=colors[family], label=family, lw=1)
        ax.axvline(base * 1.1, color="gray", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_title(concept, fontsize=9)
        ax.set_xlabel("judge perplexity (unsteered model)")
        ax.set_ylabel("success")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def top_tokens(spec_path: Path, n_edits: int = 8) -> str:
    """The first edits of a built spec with the tokens each vector writes (its sign applied)."""
    import torch

    from steer import Adapter, Spec, load_model
    from steer.vocab import project

    global _MODEL
    if "_MODEL" not in globals():
        _MODEL = load_model()
    model, tokenizer = _MODEL
    spec = Spec.load(spec_path)
    adapter = Adapter(model)
    lines = [f"{spec.name}: {len(spec.edits)} edits (count and lam chosen on held-out selection prompts; "
             f"held-out estimated perplexity rise {spec.meta.get('held_out_ppl_rise', 0):+.1%})"]
    with torch.no_grad():
        for e in spec.edits[:n_edits]:
            v = adapter.value_vectors(e.layer)[e.index].float()
            sign = -1.0 if (e.op == "set" and e.value < 0) else 1.0
            logits = project(adapter, (sign * v)[None].to(adapter.unembed.weight.dtype))[0].float()
            words = [tokenizer.decode([i]).strip() or repr(tokenizer.decode([i])) for i in logits.topk(8).indices.tolist()]
            lines.append(f"  {e.name:<10} {e.op} {e.value:+.3g}  writes: {' '.join(words)}")
    return "\n".join(lines)


def score(args) -> dict:
    from steer.evaluation.steer_eval import load_run, summarize_records

    out = Path(args.out)
    report = {task: score_task(out, task) for task in ("sentiment", "topic")}
    compose = {}
    if (out / "compose" / "none.jsonl").exists():
        from steer.evaluation.sentiment import VaderScorer
        from steer.evaluation.toxicity import get_toxicity_scorer

        tox, pos = get_toxicity_scorer("profanity-check"), VaderScorer("positive")
        for path in sorted((out / "compose").glob("*.jsonl")):
            _, rows = load_run(path)
            texts = [c for r in rows for c in r["continuations"]]
            t = tox.score(texts)
            compose[path.stem] = dict(summarize_records(rows, pos), toxic_share=sum(x >= 0.5 for x in t) / len(t),
                                      tox_prob=sum(max(tox.score(r["continuations"])) >= 0.5 for r in rows) / len(rows),
                                      mean_toxicity=sum(t) / len(t), tox_scorer=tox.name)
    return dict(report=report, compose=compose)


def missing_families(summaries: list[dict]) -> list[str]:
    """Steering families with no run for a concept (a generate stage stopped before reaching them)."""
    return [f for f in FAMILIES[1:] if not any(s["method"] == f for s in summaries)]


def complete_topics(report: dict) -> dict[str, list[dict]]:
    """The topics every family ran on: only these enter the RESULT line's topic averages."""
    return {c: s for c, s in report.get("topic", {}).items() if not missing_families(s)}


def result_line(report: dict) -> str:
    def pick(summaries, families):
        best = best_by_family(summaries)
        values = [best[f]["success"] for f in families if best[f] is not None]
        return max(values) if values else float("nan")

    values = {}
    sent = report.get("sentiment", {})
    for key, concept in (("sent_pos", "positive"), ("sent_neg", "negative")):
        if concept in sent:
            values[f"{key}_ffn"] = pick(sent[concept], [OURS])
            values[f"{key}_best_baseline"] = pick(sent[concept], BASELINES)
    topic = complete_topics(report)  # an incomplete topic would compare the FFN against baselines on other topics
    if topic:
        values["topic_ffn"] = sum(pick(s, [OURS]) for s in topic.values()) / len(topic)
        values["topic_best_baseline"] = sum(pick(s, BASELINES) for s in topic.values()) / len(topic)
    return "RESULT " + " ".join(f"{k}={v:.3f}" for k, v in values.items())


def write_docs(args, scored: dict, line: str) -> None:
    from steer.evaluation.steer_eval import markdown_table

    out, docs = Path(args.out), Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    report, compose = scored["report"], scored["compose"]
    meta_path = next(out.glob("*/none.jsonl"), None)
    from steer.evaluation.steer_eval import load_run

    meta = load_run(meta_path)[0] if meta_path else {}
    first = next((s for task in report.values() for s in task.values()), [{}])[0]
    parts = [f"_Generated by `python bench/concepts.py {' '.join(sys.argv[1:])}`: {first.get('n_prompts')} evaluation "
             f"prompts x {meta.get('samples')} samples (nucleus p = 0.9, 20 new tokens, seed {meta.get('seed')}); "
             "perplexity of each continuation given its plain prompt under the unsteered model; success judged by "
             "the scorer named above each table. 'within' marks runs whose mean judge perplexity is at most "
             "10% above unsteered and whose distinct-2 is at most 10% below it (degenerate repetition has a low "
             "perplexity too)._\n"]
    for task, title in (("sentiment", "Sentiment"), ("topic", "Topic")):
        if not report.get(task):
            continue
        parts.append(f"## {title}\n\n![{task} Pareto plot](concepts_{task}.png)\n")
        plot(report[task], docs / f"concepts_{task}.png", f"{title}: success against judge perplexity "
                                                               "(dashed: +10% over unsteered)")
        if task == "topic":
            done = list(complete_topics(report))
            partial = {c: missing_families(s) for c, s in report[task].items() if c not in done}
            absent = [f"topic:{t}" for t in FULL.topics if f"topic:{t}" not in report[task]]
            parts.append(f"Topics in the RESULT line's averages (every family ran): {', '.join(done) or 'none'}."
                         + "".join(f" **{c}: incomplete** (no runs of {', '.join(m)}: its generate stage stopped "
                                   "early), shown below but left out of the averages." for c, m in partial.items())
                         + (f" **Not generated: {', '.join(absent)}.**" if absent else "") + "\n")
        for concept, summaries in report[task].items():
            best = best_by_family(summaries)
            ours = best[OURS]["success"] if best[OURS] else float("nan")
            rivals = {f: best[f]["success"] for f in BASELINES if best[f]}
            winner = max(rivals, key=rivals.get) if rivals else None
            missing = missing_families(summaries)
            if OURS in missing:
                verdict = (f"incomplete: no {OURS} runs (generation stopped early), so no comparison; "
                           "left out of the RESULT line")
            elif winner is None or ours >= rivals[winner]:
                verdict = "FFN (builder) matches or beats every baseline"
            else:
                verdict = f"baseline {winner} wins ({rivals[winner]:.3f} against {ours:.3f} for the FFN builder)"
            if missing and OURS not in missing:
                verdict += f" (incomplete: no runs of {', '.join(missing)}; left out of the RESULT line)"
            parts.append(f"### {concept}: judged by {summaries[0]['judge']}\n\nBest success at <= +10% perplexity: "
                         + ", ".join(f"{f} {best[f]['success']:.3f} (at {best[f]['strength']:g})" if best[f] else f"{f} -"
                                     for f in FAMILIES[1:]) + f". **{verdict}.**\n")
            parts.append(markdown_table(summaries, summaries[0]["perplexity"], base_distinct=summaries[0]["distinct_2"]))
            spec_path = out / "specs" / f"{slug(concept)}.json"
            if spec_path.exists():
                parts.append("Top tokens of the chosen vectors (first 8 edits):\n\n```\n" + top_tokens(spec_path) + "\n```\n")
            actadd = out / "actadd" / f"{slug(concept)}.json"
            if actadd.exists():
                parts.append(f"Activation addition at layer {json.loads(actadd.read_text())['layer']} "
                             "(chosen on selection prompts).\n")
    if compose:
        parts.append("## Composition: detox preset (down) + positive (up) in one `generate`\n\n"
                     f"Toxicity prompts (the shipped RealToxicityPrompts dev set); toxicity by "
                     f"{next(iter(compose.values()))['tox_scorer']}, positive share by "
                     f"{next(iter(compose.values()))['judge']}; specs at strength 1 (as built).\n\n"
                     "| run | toxic share | Tox. Prob. | mean toxicity | positive share | perplexity | dist-2 |\n"
                     "|---|---:|---:|---:|---:|---:|---:|\n")
        parts[-1] += "".join(
            f"| {name} | {c['toxic_share']:.3f} | {c['tox_prob']:.3f} | {c['mean_toxicity']:.3f} | "
            f"{c['success']:.3f} | {c['perplexity']:.2f} | {c['distinct_2']:.3f} |\n"
            for name in ("none", "detox", "positive", "detox+positive") if (c := compose.get(name)))
    parts.append(f"\n```\n{line}\n```\n")
    text = "\n".join(parts)
    page = docs / "concepts.md"
    start, end = "<!-- results: written by bench/concepts.py -->", "<!-- /results -->"
    if page.exists() and start in page.read_text() and end in page.read_text():
        before, rest = page.read_text().split(start, 1)
        text = before + start + "\n" + text + "\n" + end + rest.split(end, 1)[1]
    else:
        text = "# Concept steering\n\n" + start + "\n" + text + "\n" + end + "\n"
    page.write_text(text)
    (docs / "concepts_results.json").write_text(json.dumps(scored, indent=1, default=str) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=("all", "generate", "score"), default="all")
    parser.add_argument("--task", choices=("sentiment", "topic", "all"), default="all")
    parser.add_argument("--out", default="runs/concepts")
    parser.add_argument("--docs", default=None, help="write concepts_results.md, plots and JSON into this folder")
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--size", choices=("cpu", "full"), default=None, help="default: full on cuda, cpu otherwise")
    parser.add_argument("--topics", default=None, help="comma-separated subset of the topics")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (CPU runs only)")
    args = parser.parse_args()
    size = {"cpu": CPU, "full": FULL}[args.size or ("full" if (args.device or "").startswith("cuda") else "cpu")]
    if args.topics:
        size.topics = tuple(t.strip() for t in args.topics.split(",") if t.strip())
    args.tasks = ["sentiment", "topic"] if args.task == "all" else [args.task]
    if args.stage in ("all", "generate"):
        generate(args, size)
    if args.stage == "generate":
        print(f"generated into {args.out}; score with: python bench/concepts.py --stage score --out {args.out} --docs docs")
        return
    scored = score(args)
    line = result_line(scored["report"])
    if args.docs:
        write_docs(args, scored, line)
    for task, concepts in scored["report"].items():
        for concept, summaries in concepts.items():
            missing = missing_families(summaries)
            print(f"\n{concept} ({summaries[0]['judge']})"
                  + (f": INCOMPLETE, no runs of {', '.join(missing)}; left out of the RESULT line" if missing else ""))
            from steer.evaluation.steer_eval import markdown_table

            print(markdown_table(summaries, summaries[0]["perplexity"], base_distinct=summaries[0]["distinct_2"]))
    print(line)


if __name__ == "__main__":
    main()
