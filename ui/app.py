"""The Gradio page: widgets wired to :class:`ui.engine.SteerDemo`, nothing else.

Every handler goes through :func:`_guard`, so a bad input (a malformed spec, an over-long
prompt, an unknown vector) shows as a message in the page and an unexpected failure as a
one-line error; no stack trace ever reaches the browser. Analytics are off and the app never
makes a share link: the page only talks to the machine that serves it.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from steer import SpecError  # noqa: E402
from steer.inputs import integer, number  # noqa: E402

from .engine import (BY_INDEX, BY_SCORE, COLUMNS, MODES, PRESET, WORDS,  # noqa: E402
                     Continuation, Sampling, SteerDemo)

log = logging.getLogger(__name__)

CSS = """
.steer-out textarea { font-size: 1.05em; }
footer { display: none !important; }
"""


def _guard(fn):
    """Turn any exception into a message shown in the page (gr.Error), never a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (SpecError, ValueError, KeyError, OSError) as err:
            message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            raise gr.Error(str(message), print_exception=False) from None
        except Exception as err:  # noqa: BLE001 - the page gets one line, the server log the trace
            log.exception("ui handler %s failed", fn.__name__)
            raise gr.Error(f"unexpected {type(err).__name__}: {err}", print_exception=False) from None
    return wrapper


def _stats(c: Continuation) -> str:
    score = "toxicity: n/a" if c.toxicity is None else f"**toxicity {c.toxicity:.3f}**"
    parts = [f"{score} ({c.scorer})", f"{c.tokens} tokens", f"{c.tokens_per_s:.1f} tokens/s"]
    if c.layers_saved is not None:
        parts.append(f"early exit saved {100 * c.layers_saved:.1f}% of layers")
    return " · ".join(parts)


def _summary(spec) -> str:
    layers = len({e.layer for e in spec.edits})
    text = f"**{spec.name}**: {len(spec.edits)} value-vector edits on {layers} layers"
    if getattr(spec, "layers", ()):
        text += f", and {len(spec.layers)} layer ops ({', '.join(op.to_dict()['op'] for op in spec.layers)})"
    return text


def build_app(demo: SteerDemo) -> gr.Blocks:
    """The page for ``demo``; launch it with :func:`launch`."""
    default_concept, default_n = demo.default_concept, demo.default_n()
    demo.scorer()  # load now, so the page names it (and the first request is not slower)
    default_spec = demo.default_spec()
    limits = demo.limits

    notes = [f"model **{Path(demo.name).name}** ({demo.adapter.n_layers} layers, {demo.adapter.d_ff} value vectors each)",
             f"toxicity scorer: {demo.scorer_status}"]
    if demo.preset is None:
        notes.append(f"detox preset unavailable: {demo.preset_error}")

    with gr.Blocks(title="steer: value-vector steering", analytics_enabled=False) as page:
        gr.Markdown("## steer: edit what the FFN value vectors write, and compare\n" + " · ".join(notes),
                    elem_id="notes")
        extra = gr.State(SteerDemo.extra(default_spec))
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                prompt = gr.Textbox(label="Prompt", lines=3, max_length=limits.prompt_chars, elem_id="prompt",
                                    placeholder="The text the model continues")
                concept = gr.Radio(demo.concepts, value=default_concept, label="Concept", elem_id="concept")
                words = gr.Textbox(label="Your words (comma-separated, Enter applies)", visible=default_concept == WORDS,
                                   max_length=limits.words_chars, placeholder="e.g. rain, umbrella, storm",
                                   elem_id="words")
                mode = gr.Radio(list(MODES), value=demo.default_mode(), label="Mode", visible=default_concept != PRESET,
                                info="raise / lower (builder): vectors and values chosen by their measured effect "
                                     "(steer build; the first use for new words takes minutes on CPU, then cached); "
                                     "promote / suppress: the top vectors by vocabulary projection, set to 1 or scaled to 0")
                strength = gr.Slider(0, 5, value=1.0, step=0.1, label="Strength",
                                     info="multiplies each edit's change (1 = as built, 0 = no change)")
                n_vectors = gr.Slider(1, demo.max_vectors, value=default_n, step=1,
                                      label="Number of value vectors")
                with gr.Accordion("Sampling", open=False):
                    temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1, value=0.9, step=0.05, label="Top-p")
                    max_new = gr.Slider(1, limits.max_new_tokens, value=30, step=1, label="Max new tokens")
                    seed = gr.Number(0, precision=0, minimum=0, label="Seed")
                early = gr.Checkbox(False, label="Early exit", interactive=demo.early_exit_available,
                                    info=("skip the upper layers once the exit classifier is confident"
                                          + ("" if demo.has_exit_model else "; the first use fits it for this "
                                             "model (minutes on CPU, then cached)")) if
                                    demo.early_exit_available else f"unavailable: {demo.exit_error}")
                threshold = gr.Slider(0.0, 1.0, value=lambda: demo.threshold, step=0.01, label="Exit threshold",
                                      visible=demo.early_exit_available, elem_id="threshold",
                                      info="lower exits earlier; starts at the exit model's calibrated value")
                run = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=3):
                with gr.Row(equal_height=True):
                    with gr.Column():
                        plain = gr.Textbox(label="Unsteered", lines=6, interactive=False, elem_id="unsteered",
                                           elem_classes="steer-out")
                        plain_stats = gr.Markdown(elem_id="unsteered-stats")
                    with gr.Column():
                        steered = gr.Textbox(label="Steered", lines=6, interactive=False, elem_id="steered",
                                             elem_classes="steer-out")
                        steered_stats = gr.Markdown(elem_id="steered-stats")
                summary = gr.Markdown(_summary(default_spec), elem_id="summary")
                table = gr.Dataframe(demo.rows(default_spec), headers=COLUMNS, label="Intervention (editable)",
                                     datatype=["str", "str", "number", "str"], type="array", interactive=True,
                                     static_columns=[3], max_height=300, elem_id="intervention",
                                     column_widths=["13%", "9%", "10%", "68%"])
                with gr.Row():
                    spec_name = gr.Textbox(default_spec.name, label="Intervention name", scale=2)
                    upload = gr.UploadButton("Load JSON/YAML", file_types=[".json", ".yaml", ".yml"], scale=1,
                                             elem_id="upload")
                    download = gr.DownloadButton("Download JSON", _spec_file(default_spec), scale=1,
                                                 elem_id="download")
        with gr.Accordion("Value-vector explorer", open=True):
            with gr.Row():
                query = gr.Textbox(label="Words", scale=3, max_length=limits.words_chars,
                                   placeholder="e.g. rain, umbrella", elem_id="query")
                method = gr.Radio([BY_SCORE, BY_INDEX], value=BY_SCORE, label="Find by", scale=2,
                                  info="top-30 builds the vocabulary index on first use (slow on CPU)")
                top = gr.Slider(1, 100, value=10, step=1, label="Results", scale=1)
                find = gr.Button("Find vectors", scale=1, elem_id="find")
            found = gr.Dataframe(headers=["vector", "score", "top tokens"], type="array", interactive=False,
                                 label="Value vectors promoting the words (click a row to select it)",
                                 max_height=300, elem_id="found", column_widths=["13%", "10%", "77%"])
            with gr.Row():
                chosen = gr.Textbox(label="Selected vectors", scale=3, placeholder="L25.N829, L3.N7", elem_id="chosen")
                op = gr.Dropdown(["scale", "set", "add"], value="scale", label="Op", scale=1)
                value = gr.Number(0.0, label="Value", scale=1)
                add = gr.Button("Add to intervention", scale=1, elem_id="add")
                remove = gr.Button("Remove from intervention", scale=1, elem_id="remove")

        # -- handlers ------------------------------------------------------------------------
        def show_table(spec):
            return demo.rows(spec), spec.name, demo.extra(spec), _summary(spec)

        @_guard
        def rebuild(concept, words, mode, strength, n):
            return show_table(demo.concept_spec(concept, words, mode, strength, n))

        @_guard
        def on_concept(concept):
            """Show the controls this concept uses and start it from its default count and strength."""
            return (gr.update(visible=concept == WORDS), gr.update(visible=concept != PRESET, value=demo.default_mode(concept)),
                    gr.update(value=demo.default_n(concept)), gr.update(value=1.0))

        @_guard
        def generate(prompt, rows, name, extra, temperature, top_p, max_new, seed, early, threshold):
            spec = demo.spec_from_rows(rows, name, extra)
            sampling = Sampling(number(temperature, "temperature"), number(top_p, "top-p"),
                                _int(max_new, "max new tokens"), _int(seed, "seed"))
            if early and not demo.has_exit_model:  # fitted by this request: use its calibrated threshold
                demo.exit_model()
                threshold = demo.threshold
            a, b = demo.generate(prompt, spec, sampling, bool(early), threshold)
            return a.text, _stats(a), b.text, f"*{spec.name}* · {_stats(b)}", threshold

        @_guard
        def refresh(rows, name, extra):
            """Re-validate the table after an edit; fill in the top tokens of new vectors."""
            spec = demo.spec_from_rows(rows, name, extra)
            return demo.rows(spec), _summary(spec)

        @_guard
        def save(rows, name, extra):
            return _spec_file(demo.spec_from_rows(rows, name, extra))

        def offer(rows, name, extra):
            """Keep the download button's file in step with the table (disabled while it is invalid)."""
            try:
                return gr.update(value=_spec_file(demo.spec_from_rows(rows, name, extra)), interactive=True)
            except (SpecError, ValueError):
                return gr.update(value=None, interactive=False)

        @_guard
        def load(path):
            return show_table(demo.load_spec(path))

        @_guard
        def search(query, method, top):
            return demo.search(query, _int(top, "results"), method)

        @_guard
        def pick(rows, chosen, event: gr.SelectData):
            name = str(rows[event.index[0]][0])
            names = [n.strip() for n in (chosen or "").split(",") if n.strip()]
            return ", ".join(names + ([name] if name not in names else []))

        @_guard
        def add_vectors(rows, chosen, op, value, name, extra):
            spec = demo.spec_from_rows(demo.edit_rows(rows, chosen, op, value), name, extra)
            return demo.rows(spec), _summary(spec)

        @_guard
        def remove_vectors(rows, chosen, name, extra):
            spec = demo.spec_from_rows(demo.edit_rows(rows, chosen), name, extra)
            return demo.rows(spec), _summary(spec)

        concept_inputs = [concept, words, mode, strength, n_vectors]
        table_outputs = [table, spec_name, extra, summary]
        concept.change(on_concept, concept, [words, mode, n_vectors, strength], api_visibility="private").then(
            rebuild, concept_inputs, table_outputs, api_name="intervention")
        for trigger in (mode.change, strength.release, n_vectors.release, words.submit):
            trigger(rebuild, concept_inputs, table_outputs, api_visibility="private")
        run.click(generate, [prompt, table, spec_name, extra, temperature, top_p, max_new, seed, early, threshold],
                  [plain, plain_stats, steered, steered_stats, threshold], api_name="generate")
        prompt.submit(generate, [prompt, table, spec_name, extra, temperature, top_p, max_new, seed, early,
                                 threshold], [plain, plain_stats, steered, steered_stats, threshold],
                      api_visibility="private")
        table.input(refresh, [table, spec_name, extra], [table, summary], api_visibility="private")
        download.click(save, [table, spec_name, extra], download, api_name="download")
        for trigger in (table.change, spec_name.change):
            trigger(offer, [table, spec_name, extra], download, api_visibility="private", show_progress="hidden")
        upload.upload(load, upload, table_outputs, api_name="upload")
        find.click(search, [query, method, top], found, api_name="search")
        query.submit(search, [query, method, top], found, api_visibility="private")
        found.select(pick, [found, chosen], chosen, api_visibility="private")
        add.click(add_vectors, [table, chosen, op, value, spec_name, extra], [table, summary], api_name="add")
        remove.click(remove_vectors, [table, chosen, spec_name, extra], [table, summary], api_name="remove")
    page.queue(default_concurrency_limit=4, max_size=64)
    return page


def _int(value, what: str) -> int:
    return integer(value, what)  # sliders send whole numbers as floats


def _spec_file(spec) -> str:
    """``spec`` saved as JSON in a temporary folder named by its content (Gradio serves it from its cache)."""
    text = json.dumps(spec.to_dict(), indent=2) + "\n"
    folder = Path(tempfile.gettempdir()) / "steer-ui" / hashlib.sha1(text.encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    return str(spec.save(folder / f"{_filename(spec.name)}.json"))


def _filename(name: str) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name).strip("-.")
    return safe[:60] or "intervention"


def launch(page: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, block: bool = True, **kwargs):
    """Serve ``page`` on ``host:port`` (no share link, analytics off, files up to 1 MB)."""
    return page.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block,
                       show_error=False, max_file_size="1mb", ssr_mode=False, quiet=True,
                       theme=gr.themes.Default(), css=CSS, footer_links=[], **kwargs)


__all__ = ["build_app", "launch"]
