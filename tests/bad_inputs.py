"""The catalogue of bad inputs: each one tried through the Python API, the CLI, a sweep config or
the demo, with the words its one-line error must contain.

Used by ``tests/test_bad_inputs.py`` (one test per input) and ``bench/bad_inputs.py`` (counts them,
prints the table of docs/reliability.md). A case passes when the input is refused with the
library's own error (API: a SteerError; CLI and sweeps: exit status 2 and one ``steer CMD: error:``
line, nothing written; demo: the message in the page) and that message contains ``expect``.
A traceback is any other exception; "silent" is a bad input that was taken.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from test_eval_helpers import save_tiny_lm

LONG = "a" * 600  # the tiny models' context is 512 positions (one token a character)
TINY_RUN = {"--judge": "self", "--samples": "1", "--max-new-tokens": "2", "--batch-size": "4",
            "--scorer": "profanity-check"}
SMOLLM2_SHAPE = {"name": "SmolLM2-135M-Instruct", "n_layers": 30, "d_ff": 1536, "d_model": 576}


@dataclass(frozen=True)
class Case:
    id: str
    surface: str  # "API", "CLI", "sweep" or "demo"
    input: str  # what was tried, as the table shows it
    expect: str  # words the error message must contain
    run: Callable[["Workspace"], Any]  # API: does the call; CLI: argv; sweep: config (dict or bytes); demo: (api, args)


@dataclass
class Outcome:
    kind: str  # "error" (refused as it should be), "traceback", "silent" or "half-done"
    message: str


class Workspace:
    """Tiny models and bad files in ``root`` (built once, shared by all cases)."""

    def __init__(self, root: Path):
        from steer import load_model
        from steer.generation.exit_model import ExitModel, fingerprint
        from steer.maps import LayerMaps

        import torch

        self.root = root
        self.model_dir = save_tiny_lm(root / "tiny")
        self.model, self.tokenizer = load_model(self.model_dir)
        other, _ = load_model(save_tiny_lm(root / "other", seed=1))
        # an exit model fitted (here: made) for the other tiny model: foreign to self.model
        self.foreign_exit = root / "exit-other"
        ExitModel("other", fingerprint(other), 2, 32, LayerMaps.identity([0], 32), [0], torch.zeros(1, 32),
                  torch.zeros(1)).save(self.foreign_exit)
        self._embedded = None
        files = {
            "not_utf8.txt": b"a fine prompt\n\xff\xfe a Latin-1 prompt\n",
            "empty_text.jsonl": b'{"prompt": {"text": "one"}}\n{"prompt": {"text": "two"}}\n{"prompt": {"text": ""}}\n'
                                b'{"prompt": {"text": "four"}}\n',
            "blank.txt": b"\n   \n\t\n",
            "long.txt": f"a short prompt\n{LONG}\nanother\n".encode(),
            "other_model.json": json.dumps({"name": "for-smollm2", "model": SMOLLM2_SHAPE,
                                            "edits": [{"vector": "L25.N829", "op": "set", "value": 3.0}]}).encode(),
            "dup_key.json": b'{"name": "x", "edits": [], "name": "y"}',
            "dup_key.yaml": b"name: x\nedits: []\nedits: [{vector: L0.N1, op: set, value: 1}]\n",
            "not_utf8.yaml": b"name: caf\xe9\nedits: []\n",
            "nan.json": b'{"name": "x", "edits": [{"vector": "L0.N1", "op": "set", "value": NaN}]}',
            "out_of_range.json": b'{"name": "x", "edits": [{"vector": "L1.N64", "op": "set", "value": 1.0}]}',
            "a/same.json": b'{"name": "a", "edits": []}',
            "b/same.json": b'{"name": "b", "edits": []}',
        }
        for name, content in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(content)

    def path(self, name: str) -> str:
        return str(self.root / name)

    @property
    def embedded(self):
        """The embedded SmolLM2-135M-Instruct (8,192 positions), loaded on first use."""
        if self._embedded is None:
            from steer import load_model

            self._embedded = load_model()
        return self._embedded

    def sweep(self, **settings) -> dict:
        """A small sweep config on the tiny model, with ``settings`` on top."""
        return {"model": str(self.model_dir), "judge": "self", "samples": 1, "max_new_tokens": 2, "batch_size": 4,
                "limit": 4, "scorer": "profanity-check", **settings}


# -- how each surface is tried ---------------------------------------------------------------------
def try_api(call: Callable[[], Any]) -> Outcome:
    from steer.errors import SteerError

    try:
        call()
    except SteerError as err:
        return Outcome("error", str(err))
    except Exception as err:  # noqa: BLE001 - exactly what the catalogue looks for
        return Outcome("traceback", f"{type(err).__name__}: {err}")
    return Outcome("silent", "accepted")


def try_cli(argv: list[str], out: Path | None = None) -> Outcome:
    """``steer ARGV`` in this process (as the ``steer`` script runs it); ``out``: a run folder that must stay empty."""
    from steer.ui.cli import main

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    except BaseException as err:  # noqa: BLE001 - a traceback escaping main
        return Outcome("traceback", f"{type(err).__name__}: {err}")
    text = stderr.getvalue()
    errors = [line for line in text.splitlines() if line.startswith("steer") and ": error: " in line]
    if "Traceback" in text:
        return Outcome("traceback", text[-500:])
    if code == 0:
        return Outcome("silent", "exit status 0")
    if code != 2 or len(errors) != 1:
        return Outcome("traceback", f"exit status {code}: {text[-500:]}")
    if out is not None and any(out.rglob("records-rank*.jsonl")):
        return Outcome("half-done", errors[0])
    return Outcome("error", errors[0])


def try_sweep(ws: Workspace, case_id: str, config: dict | bytes) -> Outcome:
    path = ws.root / "sweeps" / f"{case_id}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(config if isinstance(config, bytes) else yaml.safe_dump(config).encode())
    out = ws.root / "sweeps" / f"{case_id}-out"
    return try_cli(["sweep", str(path), "--out", str(out), "--quiet"], out)


def try_demo(client, api: str, args: tuple) -> Outcome:
    from gradio_client.exceptions import AppError

    try:
        client.predict(*args, api_name=api)
    except AppError as err:
        message = str(err)
        kind = "traceback" if "unexpected" in message or "Traceback" in message else "error"
        return Outcome(kind, " ".join(message.split()))
    except Exception as err:  # noqa: BLE001
        return Outcome("traceback", f"{type(err).__name__}: {err}")
    return Outcome("silent", "accepted")


def outcome(case: Case, ws: Workspace, client=None) -> Outcome:
    if case.surface == "API":
        return try_api(lambda: case.run(ws))
    if case.surface == "CLI":
        return try_cli(case.run(ws))
    if case.surface == "sweep":
        return try_sweep(ws, case.id, case.run(ws))
    api, args = case.run(ws)
    return try_demo(client, api, args)


def passed(case: Case, result: Outcome) -> bool:
    return result.kind == "error" and case.expect in result.message and "\n" not in result.message


@contextlib.contextmanager
def served_demo(ws: Workspace):
    """The demo app on a free local port, as ``steer ui`` serves it, and a gradio_client for it: a tiny
    random llama with the embedded model's tokenizer (so words and the toxicity lexicon resolve)."""
    import socket

    from gradio_client import Client

    from conftest import tiny_model
    from steer.models import prepare_tokenizer
    from steer.ui.app import build_app, launch
    from steer.ui.engine import Limits, SteerDemo

    tokenizer = ws.embedded[1]
    model = tiny_model("llama", vocab_size=len(tokenizer), initializer_range=0.3)
    prepare_tokenizer(tokenizer, model)
    page = build_app(SteerDemo(model, tokenizer, scorer="profanity-check", limits=Limits(max_new_tokens=16)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch(page, "127.0.0.1", port, block=False)
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(ws.root / "downloads"))
    finally:
        page.close()


# -- the catalogue ---------------------------------------------------------------------------------
def _run_eval(ws: Workspace, prompts, **kwargs):
    from steer.evaluation.protocol import run_eval

    settings = dict(samples=1, max_new_tokens=2, scorer="profanity-check", progress=False) | kwargs
    return run_eval(ws.model, ws.tokenizer, prompts, **settings)


def _spec(**kwargs):
    from steer import Spec

    return Spec.from_dict({"name": "x", **kwargs})


def _steer_with(ws: Workspace, path: str):
    from steer import Spec, steering

    with steering(ws.model, Spec.load(path)):
        pass


def _early_exit(ws: Workspace):
    from steer.generation import early_exit, load_exit_model

    with early_exit(ws.model, load_exit_model(ws.foreign_exit), 0.9):
        pass


def _demo(ws: Workspace, **kwargs):
    from steer.ui.engine import SteerDemo

    return SteerDemo(ws.model, ws.tokenizer, **kwargs)


def _encode(ws: Workspace, text: str, model=None, tokenizer=None, new: int = 5):
    from steer.inputs import encode_prompt

    return encode_prompt(tokenizer or ws.tokenizer, model or ws.model, text, new)


def _imp(module: str, name: str):
    import importlib

    return getattr(importlib.import_module(module), name)


API = [
    Case("api-empty-prompt", "API", 'encode_prompt(tokenizer, model, "")', "the prompt is empty",
         lambda ws: _encode(ws, "")),
    Case("api-whitespace-prompt", "API", 'encode_prompt(..., " \\n\\t")', "only whitespace",
         lambda ws: _encode(ws, " \n\t")),
    Case("api-prompt-not-text", "API", "encode_prompt(..., None)", "must be text", lambda ws: _encode(ws, None)),
    Case("api-over-context", "API", "encode_prompt(...) with 600 tokens on a 512-position model", "context of 512",
         lambda ws: _encode(ws, LONG)),
    Case("api-over-context-smollm2", "API", "a 9,001-token prompt on SmolLM2 (8,192 positions)", "context of 8192",
         lambda ws: _encode(ws, "hello" + " world" * 9000, *ws.embedded, new=40)),
    Case("api-run-eval-empty-prompt", "API", 'run_eval(..., ["fine", ""])', "prompt 1 is empty",
         lambda ws: _run_eval(ws, ["fine", ""])),
    Case("api-run-eval-over-context", "API", "run_eval(...) with a 600-token prompt", "prompt 1 is 600 tokens",
         lambda ws: _run_eval(ws, ["fine", LONG])),
    Case("api-run-eval-nan-top-p", "API", "run_eval(..., top_p=nan)", "top_p must be finite",
         lambda ws: _run_eval(ws, ["fine"], top_p=math.nan)),
    Case("api-run-eval-zero-samples", "API", "run_eval(..., samples=0)", "samples must be >= 1",
         lambda ws: _run_eval(ws, ["fine"], samples=0)),
    Case("api-prompt-file-not-utf8", "API", "load_prompt_set(a Latin-1 file)", "not_utf8.txt:2: prompt file is not UTF-8",
         lambda ws: _imp("steer.evaluation.prompts", "load_prompt_set")(ws.path("not_utf8.txt"))),
    Case("api-prompt-file-empty-text", "API", 'load_prompt_set(JSONL with "text": "" on line 3)',
         "empty_text.jsonl:3 is empty", lambda ws: _imp("steer.evaluation.prompts", "load_prompt_set")(
             ws.path("empty_text.jsonl"))),
    Case("api-prompt-file-blank", "API", "load_prompt_set(a file of blank lines)", "no prompts in",
         lambda ws: _imp("steer.evaluation.prompts", "load_prompt_set")(ws.path("blank.txt"))),
    Case("api-edit-nan", "API", 'Spec.build("x", [("L0.N1", "set", nan)])', "must be finite",
         lambda ws: _imp("steer", "Spec").build("x", [("L0.N1", "set", math.nan)])),
    Case("api-edit-inf", "API", 'Spec.build("x", [("L0.N1", "add", inf)])', "must be finite",
         lambda ws: _imp("steer", "Spec").build("x", [("L0.N1", "add", math.inf)])),
    Case("api-edit-huge-int", "API", "an edit value of 10**400 in a spec", "must be finite",
         lambda ws: _spec(edits=[{"vector": "L0.N1", "op": "set", "value": 10**400}])),
    Case("api-vector-name", "API", 'VectorName.parse("L3N5")', "bad value-vector name",
         lambda ws: _imp("steer", "VectorName").parse("L3N5")),
    Case("api-vector-name-zeros", "API", 'VectorName.parse("L03.N5") (a second spelling)', "bad value-vector name",
         lambda ws: _imp("steer", "VectorName").parse("L03.N5")),
    Case("api-spec-edits-not-list", "API", 'Spec.from_dict({"name": "x", "edits": 5})', "'edits' must be a list",
         lambda ws: _spec(edits=5)),
    Case("api-spec-meta-not-mapping", "API", 'Spec.from_dict({"name": "x", "meta": "abc"})', "'meta' must be a mapping",
         lambda ws: _spec(meta="abc")),
    Case("api-spec-duplicate-key", "API", 'Spec.load(JSON with "name" twice)', "key 'name' is given twice",
         lambda ws: _imp("steer", "Spec").load(ws.path("dup_key.json"))),
    Case("api-spec-not-utf8", "API", "Spec.load(a Latin-1 YAML file)", "not_utf8.yaml:1: spec is not UTF-8",
         lambda ws: _imp("steer", "Spec").load(ws.path("not_utf8.yaml"))),
    Case("api-spec-other-model", "API", "steering(model, a spec made for SmolLM2)", "was made for SmolLM2-135M-Instruct",
         lambda ws: _steer_with(ws, ws.path("other_model.json"))),
    Case("api-spec-out-of-range", "API", "steering(model, spec with L1.N64 on a 64-vector layer)", "index 64 out of range",
         lambda ws: _steer_with(ws, ws.path("out_of_range.json"))),
    Case("api-concept-empty", "API", 'Concept.from_words("c", [" ", ""], tokenizer)', "is empty",
         lambda ws: _imp("steer", "Concept").from_words("c", [" ", ""], ws.tokenizer)),
    Case("api-concept-str", "API", 'Concept.from_words("c", "rain", tokenizer) (a string, not a list)',
         "must be a list of strings", lambda ws: _imp("steer", "Concept").from_words("c", "rain", ws.tokenizer)),
    Case("api-strength-nan", "API", "with_strength(spec, nan)", "strength must be finite",
         lambda ws: _imp("steer.evaluation.sweep", "with_strength")(_spec(edits=[]), math.nan)),
    Case("api-first-vectors-zero", "API", "first_vectors(spec, 0)", "n_vectors must be >= 1",
         lambda ws: _imp("steer.evaluation.sweep", "first_vectors")(_spec(edits=[]), 0)),
    Case("api-unknown-scorer", "API", 'get_toxicity_scorer("perspective")', "unknown scorer 'perspective'",
         lambda ws: _imp("steer.evaluation.toxicity", "get_toxicity_scorer")("perspective")),
    Case("api-missing-exit-model", "API", "load_exit_model(a folder that is not one)", "is not an exit model folder",
         lambda ws: _imp("steer.generation", "load_exit_model")(ws.root)),
    Case("api-foreign-exit-model", "API", "early_exit(model, an exit model fitted for another model)", "fitted for",
         _early_exit),
    Case("api-unknown-device", "API", 'load_model(path, device="banana")', "unknown device 'banana'",
         lambda ws: _imp("steer", "load_model")(ws.model_dir, device="banana")),
    Case("api-missing-model", "API", 'load_model("/no/such/model")', "could not load model",
         lambda ws: _imp("steer", "load_model")("/no/such/model")),
    Case("api-demo-unknown-scorer", "API", 'SteerDemo(model, tokenizer, scorer="perspective")', "unknown scorer",
         lambda ws: _demo(ws, scorer="perspective")),
    Case("api-demo-foreign-exit-model", "API", "SteerDemo(..., exit_model=one fitted for another model)", "fitted for",
         lambda ws: _demo(ws, exit_model=str(ws.foreign_exit))),
    Case("api-demo-nan-threshold", "API", "SteerDemo(..., exit_threshold=nan)", "exit threshold must be finite",
         lambda ws: _demo(ws, exit_threshold=math.nan)),
]


def _gen(ws: Workspace, *extra: str) -> list[str]:
    return ["generate", *extra, "--model", str(ws.model_dir)]


def _eval(ws: Workspace, *extra: str) -> list[str]:
    """``steer eval`` on the tiny model, quick settings, ``extra`` options (replacing a quick one of the same name)."""
    quick = [x for k, v in TINY_RUN.items() if k not in extra for x in (k, v)]
    return ["eval", "--model", str(ws.model_dir), *quick, "--quiet", "--out", str(ws.root / "eval-out"), *extra]


CLI = [
    Case("cli-generate-empty", "CLI", 'steer generate ""', "the prompt is empty", lambda ws: _gen(ws, "")),
    Case("cli-generate-whitespace", "CLI", 'steer generate "   "', "only whitespace", lambda ws: _gen(ws, "   ")),
    Case("cli-generate-over-context", "CLI", "steer generate <600 tokens> (context 512)", "--truncate", lambda ws: _gen(ws, LONG)),
    Case("cli-generate-over-context-smollm2", "CLI", "steer generate <9,001 tokens> on SmolLM2", "context of 8192",
         lambda ws: ["generate", "hello" + " world" * 9000]),
    Case("cli-generate-zero-tokens", "CLI", "steer generate hi --max-new-tokens 0", "must be >= 1",
         lambda ws: _gen(ws, "hi", "--max-new-tokens", "0")),
    Case("cli-generate-nan-top-p", "CLI", "steer generate hi --top-p nan", "argument --top-p: the value must be finite",
         lambda ws: _gen(ws, "hi", "--top-p", "nan")),
    Case("cli-generate-threshold-alone", "CLI", "steer generate hi --threshold 0.5 (no --early-exit)",
         "--threshold needs --early-exit", lambda ws: _gen(ws, "hi", "--threshold", "0.5")),
    Case("cli-generate-twice", "CLI", "steer generate hi --seed 1 --seed 2", "--seed is given twice",
         lambda ws: _gen(ws, "hi", "--seed", "1", "--seed", "2")),
    Case("cli-generate-missing-exit", "CLI", "steer generate hi --early-exit NOT_A_FOLDER", "is not an exit model folder",
         lambda ws: _gen(ws, "hi", "--early-exit", str(ws.root / "nope"))),
    Case("cli-generate-foreign-exit", "CLI", "steer generate hi --early-exit EXIT_OF_ANOTHER_MODEL", "fitted for",
         lambda ws: _gen(ws, "hi", "--early-exit", str(ws.foreign_exit))),
    Case("cli-generate-other-spec", "CLI", "steer generate hi --intervention SPEC_FOR_SMOLLM2", "was made for",
         lambda ws: _gen(ws, "hi", "--intervention", ws.path("other_model.json"))),
    Case("cli-generate-dup-key-spec", "CLI", "steer generate hi --intervention SPEC_WITH_A_KEY_TWICE.yaml",
         "key 'edits' is given twice", lambda ws: _gen(ws, "hi", "--intervention", ws.path("dup_key.yaml"))),
    Case("cli-generate-nan-spec", "CLI", "steer generate hi --intervention SPEC_WITH_NaN.json", "must be finite",
         lambda ws: _gen(ws, "hi", "--intervention", ws.path("nan.json"))),
    Case("cli-generate-bad-device", "CLI", "steer generate hi --device cuda:7", "'cuda:7'",
         lambda ws: _gen(ws, "hi", "--device", "cuda:7")),
    Case("cli-missing-model", "CLI", "steer generate hi --model ./no/such/model", "could not load model",
         lambda ws: ["generate", "hi", "--model", "./no/such/model"]),
    Case("cli-eval-not-utf8", "CLI", "steer eval --prompt-file LATIN1.txt", "not_utf8.txt:2: prompt file is not UTF-8",
         lambda ws: _eval(ws, "--prompt-file", ws.path("not_utf8.txt"))),
    Case("cli-eval-empty-text", "CLI", 'steer eval --prompt-file FILE.jsonl (line 3: "text": "")',
         "empty_text.jsonl:3 is empty", lambda ws: _eval(ws, "--prompt-file", ws.path("empty_text.jsonl"))),
    Case("cli-eval-blank-file", "CLI", "steer eval --prompt-file BLANK_LINES.txt", "no prompts in",
         lambda ws: _eval(ws, "--prompt-file", ws.path("blank.txt"))),
    Case("cli-eval-over-context", "CLI", "steer eval --prompt-file FILE.txt (line 2: 600 tokens)",
         "long.txt:2 is 600 tokens", lambda ws: _eval(ws, "--prompt-file", ws.path("long.txt"))),
    Case("cli-eval-unknown-scorer", "CLI", "steer eval --scorer perspective", "unknown scorer 'perspective'",
         lambda ws: _eval(ws, "--scorer", "perspective")),
    Case("cli-eval-unknown-judge", "CLI", 'steer eval --judge "not a model!"', "unknown judge",
         lambda ws: _eval(ws, "--judge", "not a model!")),
    Case("cli-eval-exit-threshold-alone", "CLI", "steer eval --exit-threshold 0.5 (no --early-exit)",
         "--exit-threshold needs --early-exit", lambda ws: _eval(ws, "--exit-threshold", "0.5")),
    Case("cli-eval-strength-without-spec", "CLI", "steer eval --strength 2 (only 'none' evaluated)", "only 'none'",
         lambda ws: _eval(ws, "--strength", "2")),
    Case("cli-eval-zero-samples", "CLI", "steer eval --samples 0", "'samples' must be a whole number >= 1",
         lambda ws: _eval(ws, "--samples", "0")),
    Case("cli-eval-same-run-name", "CLI", "steer eval --compare a/same.json,b/same.json", "share the run name",
         lambda ws: _eval(ws, "--compare", f"{ws.path('a/same.json')},{ws.path('b/same.json')}")),
    Case("cli-eval-inf-strength", "CLI", "steer eval --compare SPEC --strength inf", "must be finite",
         lambda ws: _eval(ws, "--compare", ws.path("a/same.json"), "--strength", "inf")),
    Case("cli-vectors-index", "CLI", "steer vectors show 0 999", "index 999 out of range",
         lambda ws: ["vectors", "show", "0", "999", "--model", str(ws.model_dir)]),
    Case("cli-vectors-n", "CLI", "steer vectors show 0 1 -n 0", "argument -n: the value must be >= 1",
         lambda ws: ["vectors", "show", "0", "1", "-n", "0", "--model", str(ws.model_dir)]),
    Case("cli-layers-not-utf8", "CLI", "steer layers scan --text LATIN1.txt", "not_utf8.txt:2: --text is not UTF-8",
         lambda ws: ["layers", "scan", "--text", ws.path("not_utf8.txt"), "--model", str(ws.model_dir)]),
    Case("cli-layers-block", "CLI", "steer layers scan --block 0", "argument --block: the value must be >= 1",
         lambda ws: ["layers", "scan", "--text", ws.path("long.txt"), "--block", "0"]),
    Case("cli-layers-nan-budget", "CLI", "steer layers scan --max-ppl-rise nan", "must be finite",
         lambda ws: ["layers", "scan", "--text", ws.path("long.txt"), "--max-ppl-rise", "nan"]),
    Case("cli-fit-layers", "CLI", "steer early-exit fit --layers 1,x", "--layers takes layer numbers",
         lambda ws: ["early-exit", "fit", "--text", ws.path("long.txt"), "--out", str(ws.root / "em"), "--layers",
                     "1,x", "--model", str(ws.model_dir)]),
    Case("cli-ui-unknown-scorer", "CLI", "steer ui --scorer perspective", "unknown scorer 'perspective'",
         lambda ws: ["ui", "--scorer", "perspective", "--model", str(ws.model_dir)]),
    Case("cli-ui-foreign-exit", "CLI", "steer ui --exit-model EXIT_OF_ANOTHER_MODEL", "fitted for",
         lambda ws: ["ui", "--exit-model", str(ws.foreign_exit), "--model", str(ws.model_dir)]),
    Case("cli-ui-threshold", "CLI", "steer ui --exit-threshold 1.5", "must be between 0.0 and 1.0",
         lambda ws: ["ui", "--exit-threshold", "1.5", "--model", str(ws.model_dir)]),
]

SWEEPS = [
    Case("sweep-not-utf8", "sweep", "a sweep config in Latin-1", "is not UTF-8",
         lambda ws: b"samples: 1\nname: caf\xe9\n"),
    Case("sweep-dup-key", "sweep", "samples: given twice", "key 'samples' is given twice",
         lambda ws: b"samples: 1\nsamples: 5\n"),
    Case("sweep-nan-top-p", "sweep", "top_p: .nan", "'top_p' must be finite", lambda ws: ws.sweep(top_p=math.nan)),
    Case("sweep-inf-strength", "sweep", "grid: {strength: [.inf]}", "grid.strength entries must be finite",
         lambda ws: ws.sweep(grid={"intervention": [ws.path("a/same.json")], "strength": [math.inf]})),
    Case("sweep-nan-threshold", "sweep", "early_exit: {exit_model: DIR, threshold: .nan}", "early_exit.threshold must be",
         lambda ws: ws.sweep(early_exit={"exit_model": str(ws.foreign_exit), "threshold": math.nan},
                             grid={"early_exit": [True]})),
    Case("sweep-unknown-scorer", "sweep", "scorer: perspective", "unknown scorer 'perspective'",
         lambda ws: ws.sweep(scorer="perspective")),
    Case("sweep-unknown-judge", "sweep", 'judge: "no such judge!"', "unknown judge", lambda ws: ws.sweep(judge="no such judge!")),
    Case("sweep-unknown-key", "sweep", "sample: 5 (a typo)", "unknown key(s) sample", lambda ws: ws.sweep(sample=5)),
    Case("sweep-n-vectors-zero", "sweep", "grid: {n_vectors: [0]}", "grid.n_vectors entries",
         lambda ws: ws.sweep(grid={"n_vectors": [0]})),
    Case("sweep-empty-prompt-mid-file", "sweep", 'prompts: FILE.jsonl (line 3 of 4: "text": "")',
         "empty_text.jsonl:3 is empty", lambda ws: ws.sweep(prompts=ws.path("empty_text.jsonl"))),
    Case("sweep-long-prompt-mid-file", "sweep", "prompts: FILE.txt (line 2 of 3: 600 tokens)", "long.txt:2 is 600 tokens",
         lambda ws: ws.sweep(prompts=ws.path("long.txt"))),
    Case("sweep-missing-exit-model", "sweep", "grid: {early_exit: [false, true]} with a missing exit model",
         "is not an exit model folder", lambda ws: ws.sweep(early_exit={"exit_model": str(ws.root / "nope"),
                                                                         "threshold": 0.9},
                                                             grid={"early_exit": [False, True]})),
    Case("sweep-foreign-exit-model", "sweep", "early_exit: {exit_model: EXIT_OF_ANOTHER_MODEL}", "fitted for",
         lambda ws: ws.sweep(early_exit={"exit_model": str(ws.foreign_exit), "threshold": 0.9},
                             grid={"early_exit": [False, True]})),
    Case("sweep-other-model-spec", "sweep", "grid: {intervention: [none, SPEC_FOR_SMOLLM2]}", "was made for",
         lambda ws: ws.sweep(grid={"intervention": ["none", ws.path("other_model.json")]})),
]


def _rows(*rows) -> dict:
    return {"headers": ["vector", "op", "value", "top tokens"], "data": [list(r) + [""] for r in rows]}


def _generate(prompt: str = "The weather today is", rows=(("L1.N3", "set", 4.0),), **s) -> tuple:
    s = dict(temperature=1.0, top_p=0.9, max_new=4, seed=0, early=False, threshold=0.9) | s
    return "/generate", (prompt, _rows(*rows), "spec", s["temperature"], s["top_p"], s["max_new"], s["seed"],
                         s["early"], s["threshold"])


def _upload(ws: Workspace, name: str) -> tuple:
    from gradio_client import handle_file

    return "/upload", (handle_file(ws.path(name)),)


DEMO = [
    Case("demo-empty-prompt", "demo", "Generate with an empty prompt", "the prompt is empty", lambda ws: _generate("")),
    Case("demo-whitespace-prompt", "demo", "Generate with a prompt of spaces", "only whitespace",
         lambda ws: _generate("   ")),
    Case("demo-long-prompt", "demo", "Generate with 2,001 characters", "characters long", lambda ws: _generate("x" * 2001)),
    Case("demo-value-text", "demo", 'table row value "lots"', "value must be a number",
         lambda ws: _generate(rows=[("L1.N3", "set", "lots")])),
    Case("demo-value-nan", "demo", 'table row value "nan"', "must be finite",
         lambda ws: _generate(rows=[("L1.N3", "set", "nan")])),
    Case("demo-bad-vector", "demo", 'table row vector "layer 3"', "bad value-vector name",
         lambda ws: _generate(rows=[("layer 3", "set", 1.0)])),
    Case("demo-unknown-layer", "demo", "table row vector L9.N1 (2 layers)", "unknown layer 9",
         lambda ws: _generate(rows=[("L9.N1", "set", 1.0)])),
    Case("demo-unknown-op", "demo", 'table row op "zap"', "unknown op 'zap'",
         lambda ws: _generate(rows=[("L1.N3", "zap", 1.0)])),
    Case("demo-upload-not-utf8", "demo", "upload a Latin-1 YAML spec", "not_utf8.yaml:1: spec is not UTF-8",
         lambda ws: _upload(ws, "not_utf8.yaml")),
    Case("demo-upload-other-model", "demo", "upload a spec made for SmolLM2", "was made for",
         lambda ws: _upload(ws, "other_model.json")),
    Case("demo-upload-dup-key", "demo", "upload a YAML spec with a key twice", "given twice",
         lambda ws: _upload(ws, "dup_key.yaml")),
    Case("demo-search-empty", "demo", "Find vectors for no words", "type one or more words",
         lambda ws: ("/search", ("", "z-score ranking", 5))),
    Case("demo-add-nan", "demo", 'Add L1.N4 with value "nan"', "value must be a number",
         lambda ws: ("/add", (_rows(("L1.N3", "set", 1.0)), "L1.N4", "set", "nan", "spec"))),
    Case("demo-add-bad-name", "demo", 'Add vector "L1.N"', "bad value-vector name",
         lambda ws: ("/add", (_rows(("L1.N3", "set", 1.0)), "L1.N", "set", 1.0, "spec"))),
]

CASES = API + CLI + SWEEPS + DEMO
