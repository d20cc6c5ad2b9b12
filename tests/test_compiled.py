"""Steering on the compiled path (issue 17): a compiled static-cache decode step carries the edits
on every token, per request, and a spec change rewrites buffer contents without recompiling.

On CPU transformers compiles the decode step only when asked (``compile_config`` with
``_compile_all_devices``); the ``eager`` backend traces the same dynamo graph as inductor, fast.
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import CompileConfig

from conftest import tiny_model
from steer import Adapter, Spec, SteeringProcessor, steering
from steer.errors import SteerError
from steer.layers import LayerOp
from steer.slots import install_slots, remove_slots, slots_of

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = torch.tensor([[5, 17, 33, 8], [9, 4, 61, 12], [7, 7, 30, 2], [40, 3, 22, 19]])
STEPS = 6


def compile_config() -> CompileConfig:
    config = CompileConfig(backend="eager", mode=None, fullgraph=True)
    config._compile_all_devices = True  # transformers compiles on CUDA only unless told
    return config


def generate(model, ids=PROMPT[:1], compiled=True, **kwargs):
    extra = dict(cache_implementation="static", compile_config=compile_config()) if compiled else {}
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS, min_new_tokens=STEPS,
                         do_sample=False, **extra, **kwargs)
    return out[:, ids.shape[1]:]


def forcing(model, layer: int, index: int) -> tuple[Spec, int]:
    """A spec that sets one value vector's coefficient huge, and the token it then forces."""
    adapter = Adapter(model)
    top = int(adapter.readout(adapter.value_vectors(layer)[index][None]).argmax())
    return Spec.build(f"force L{layer}.N{index}", [(f"L{layer}.N{index}", "set", 3000.0)], model=model), top


@pytest.fixture
def model():
    torch._dynamo.reset()
    yield tiny_model("llama", layers=2)
    torch._dynamo.reset()


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_steering_after_a_compiled_generate_acts_on_every_step(model):
    plain = generate(model)
    assert "_compiled_call" in model.__dict__  # the decode step really was compiled
    spec, top = forcing(model, 1, 5)
    assert (plain != top).any()
    with steering(model, spec):
        steered = generate(model)
    assert (steered == top).all(), steered  # the prefill and every compiled step
    assert torch.equal(generate(model), plain)  # and nothing is left behind


def test_processor_steers_every_compiled_step_and_spec_changes_do_not_recompile(model):
    plain = generate(model)
    specs = [forcing(model, 1, n) for n in (5, 9, 13)]
    steered = generate(model, logits_processor=[SteeringProcessor(model, specs[0][0])])
    assert (steered == specs[0][1]).all()
    before = graphs()
    for spec, top in specs[1:] + specs[:1]:
        out = generate(model, logits_processor=[SteeringProcessor(model, spec)])
        assert (out == top).all(), (spec.name, out)
    weaker = Spec.build("weaker", [("L1.N5", "set", 1.5)], model=model)  # another strength, same vector
    generate(model, logits_processor=[SteeringProcessor(model, weaker)])
    assert graphs() == before, "a spec change recompiled the decode step"
    assert torch.equal(generate(model), plain)


def test_per_row_specs_in_one_compiled_call_equal_each_spec_alone(model):
    specs = [forcing(model, 1, 5)[0], None, Spec.build("mix", [("L0.N3", "scale", -4.0), ("L1.N7", "add", 9.0)],
                                                        model=model), forcing(model, 1, 13)[0]]
    alone = [generate(model, PROMPT[i:i + 1], compiled=False, logits_processor=[SteeringProcessor(model, spec)])
             if spec is not None else generate(model, PROMPT[i:i + 1], compiled=False) for i, spec in enumerate(specs)]
    batch = generate(model, PROMPT, logits_processor=[SteeringProcessor(model, specs)])
    assert torch.equal(batch, torch.cat(alone)), (batch, alone)
    before = graphs()
    swapped = generate(model, PROMPT, logits_processor=[SteeringProcessor(model, specs[::-1])])
    assert graphs() == before
    assert (swapped[0] == forcing(model, 1, 13)[1]).all() and (swapped[3] == forcing(model, 1, 5)[1]).all()


def test_context_manager_on_a_fresh_model_compiling_inside_generate_steers_and_leaves_nothing(model):
    spec, top = forcing(model, 1, 5)
    with steering(model, spec):  # eager hooks; generate compiles with them and guards on them
        assert (generate(model) == top).all()
    assert torch.equal(generate(model), generate(model, compiled=False))


def test_a_step_that_escapes_the_edit_raises(model, monkeypatch):
    """A compile steer cannot see: the processor's per-step check fails loudly, never silently."""
    import sys

    steering_module = sys.modules["steer.steering"]

    generate(model)  # the plain decode step is compiled and cached
    monkeypatch.setattr(steering_module, "may_compile", lambda model, kwargs: False)
    monkeypatch.setattr(steering_module, "is_compiled", lambda model: False)
    spec, _ = forcing(model, 1, 5)
    with pytest.raises(SteerError, match="did not run in this decoding step"):
        generate(model, logits_processor=[SteeringProcessor(model, spec)])


def test_eager_only_interventions_refuse_the_compiled_path(model):
    install_slots(model)
    with pytest.raises(SteerError, match="layer ops"):
        with steering(model, Spec("skip", layers=(LayerOp("skip", (1,)),))):
            pass
    remove_slots(model)
    with steering(model, Spec("skip", layers=(LayerOp("skip", (1,)),))):
        with pytest.raises(SteerError, match="eager path"):
            generate(model)


def test_slots_are_exact_when_idle_and_removable(model):
    ids = PROMPT
    reference = model(ids).logits
    slots = install_slots(model)
    assert torch.equal(model(ids).logits, reference)  # identity slots: bit-identical
    spec, _ = forcing(model, 1, 5)
    with steering(model, spec):
        with_slots = model(ids).logits
    remove_slots(model)
    with steering(model, spec):  # eager hooks
        eager = model(ids).logits
    torch.testing.assert_close(with_slots, eager)
    assert slots_of(model) is None and not slots.handles[0].hooks_dict_ref()
    assert not any(name.startswith("_steer") for name, _ in model.named_buffers())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: transformers' own compiled path")
def test_cuda_static_cache_cuda_graphs_steer_every_token_per_request():
    """What users run on a GPU: ``cache_implementation="static"`` compiles with inductor and replays
    a CUDA graph. Every step is steered, per row, and spec changes do not recompile."""
    torch._dynamo.reset()
    model = tiny_model("llama", layers=2).to("cuda", torch.bfloat16)
    ids = PROMPT.cuda()

    def run(specs, rows=ids):
        out = model.generate(rows, attention_mask=torch.ones_like(rows), max_new_tokens=STEPS, min_new_tokens=STEPS,
                             do_sample=False, cache_implementation="static",
                             logits_processor=[SteeringProcessor(model, specs)] if specs is not None else None)
        return out[:, rows.shape[1]:].cpu()

    plain = run(None)
    forced = [forcing(model, 1, n) for n in (5, 9, 13)]
    assert (run(forced[0][0], ids[:1]) == forced[0][1]).all()
    before = graphs()
    for spec, top in forced[1:]:
        assert (run(spec, ids[:1]) == top).all()
    per_row = run([forced[0][0], None, forced[1][0], forced[2][0]])
    assert (per_row[0] == forced[0][1]).all() and (per_row[2] == forced[1][1]).all() and (per_row[3] == forced[2][1]).all()
    assert torch.equal(per_row[1], plain[1])
    assert graphs() - before <= 1  # batch 4 may compile once; spec changes never do
    again = run([forced[2][0], None, forced[0][0], forced[1][0]])
    assert graphs() - before <= 1 and (again[0] == forced[2][1]).all()
    assert torch.equal(run(None), plain)


def test_run_eval_compiled_gives_the_uncompiled_numbers(monkeypatch):
    """``steer eval --compile``: the same samples and scores as eager generation, spec included."""
    from steer.evaluation.protocol import run_eval
    from steer.evaluation.toxicity import ProfanityCheckScorer
    from test_eval_helpers import tiny_lm

    torch._dynamo.reset()
    monkeypatch.setattr("steer.evaluation.protocol.compile_config", lambda model: compile_config())
    lm, tokenizer = tiny_lm()
    spec = Spec.build("s", [("L1.N3", "set", 4.0), ("L0.N1", "scale", -2.0)], model=lm)
    kwargs = dict(samples=2, max_new_tokens=6, scorer=ProfanityCheckScorer(), progress=False, batch_size=4)
    prompts = ["ab cd", "ef gh ij", "kl"]
    for s in (None, spec):
        eager, compiled = run_eval(lm, tokenizer, prompts, s, **kwargs), run_eval(lm, tokenizer, prompts, s, compile=True, **kwargs)
        for key in ("perplexity", "distinct_1", "distinct_3", "emt"):
            assert compiled[key] == pytest.approx(eager[key], rel=1e-5, nan_ok=True), key
        assert eager["perplexity"] == eager["perplexity"]  # a number, not NaN
    assert "_compiled_call" in lm.__dict__ and slots_of(lm) is not None


def test_a_forward_the_user_compiled_is_steered_on_every_step(model):
    """The shape seen on the embedded model: ``model.forward = torch.compile(model.forward)``, one
    plain generate, then steering (context manager and processor) must reach every token."""
    model.forward = torch.compile(model.forward, backend="eager", fullgraph=False)
    plain = generate(model, compiled=False)
    spec, top = forcing(model, 1, 9)
    with steering(model, spec):
        assert (generate(model, compiled=False) == top).all()
    assert (generate(model, compiled=False, logits_processor=[SteeringProcessor(model, spec)]) == top).all()
    assert torch.equal(generate(model, compiled=False), plain)


def test_a_module_wrapped_by_torch_compile_is_steered_through_its_wrapper(model):
    """``opt = torch.compile(model)``; steering ``opt`` reaches every call of ``opt``."""
    opt = torch.compile(model, backend="eager")
    ids = PROMPT[:1]
    reference = opt(ids).logits  # traced and cached without any hook
    spec, top = forcing(model, 1, 9)
    with steering(opt, spec):
        steered = opt(ids).logits
    assert int(steered[0, -1].argmax()) == top and not torch.equal(steered, reference)
    torch.testing.assert_close(opt(ids).logits, reference)
