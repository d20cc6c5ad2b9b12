"""Steering hooks: exactness, generate modes, per-row specs, cleanup, bad input."""
from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from conftest import tiny_model
from steer import Adapter, Spec, SpecError, SteeringProcessor, steering

PROMPT = torch.tensor([[5, 17, 33, 8, 61, 12]])


def logits_of(model, ids=PROMPT, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def no_hooks(model) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def spec_for(model, edits, name="t"):
    return Spec.build(name, edits, model=model)


def test_empty_and_unit_scale_are_bit_identical(any_tiny):
    model = any_tiny
    bare = logits_of(model)
    with steering(model, spec_for(model, [])):
        assert torch.equal(logits_of(model), bare)
    unit = spec_for(model, [(layer, i, "scale", 1.0) for layer in range(2) for i in (0, 3, 7)])
    with steering(model, unit):
        assert torch.equal(logits_of(model), bare)
    assert no_hooks(model)


def test_set_changes_ffn_output_by_exact_delta(any_tiny):
    model = any_tiny
    adapter = Adapter(model)
    layer, k, c = 1, 5, 3.0
    seen = {}

    def capture(name):
        def hook(module, args, output):
            seen[name] = (args[0].detach().clone(), output.detach().clone())
        return hook

    handle = adapter.ffn_out(layer).register_forward_hook(capture("bare"))
    logits_of(model)
    handle.remove()
    handle = adapter.ffn_out(layer).register_forward_hook(capture("steered"))
    # Steer only this layer, so the FFN input of `layer` is unchanged and the delta is exact.
    with steering(model, spec_for(model, [(layer, k, "set", c)])):
        logits_of(model)
    handle.remove()
    coefficients, bare_out = seen["bare"]
    steered_in, steered_out = seen["steered"]
    assert torch.all(steered_in[..., k] == c)
    expected = (c - coefficients[..., k])[..., None] * adapter.value_vectors(layer)[k]
    torch.testing.assert_close(steered_out - bare_out, expected, atol=1e-5, rtol=1e-4)


def test_ops_compose_in_order():
    model = tiny_model("llama")
    adapter = Adapter(model)
    seen = []
    handle = adapter.ffn_out(0).register_forward_pre_hook(lambda m, a: seen.append(a[0][..., 4].clone()))
    logits_of(model)
    with steering(model, spec_for(model, [(0, 4, "scale", 2.0), (0, 4, "add", 1.5), (0, 4, "scale", -1.0)])):
        logits_of(model)
    handle.remove()
    # The recording hook was registered first, so it saw the coefficients before our edit;
    # run once more with ours first to see the edited value.
    bare = seen[0]
    seen.clear()
    with steering(model, spec_for(model, [(0, 4, "scale", 2.0), (0, 4, "add", 1.5), (0, 4, "scale", -1.0)])):
        handle = adapter.ffn_out(0).register_forward_pre_hook(lambda m, a: seen.append(a[0][..., 4].clone()))
        logits_of(model)
        handle.remove()
    torch.testing.assert_close(seen[0], -(bare * 2.0 + 1.5))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_generate_with_and_without_cache_agree(family):
    model = tiny_model(family)
    spec = spec_for(model, [(1, 9, "scale", -2.0)] + [(0, i, "set", 40.0) for i in range(0, 40, 3)])
    with steering(model, spec):
        cached = model.generate(PROMPT, max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = model.generate(PROMPT, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    plain = model.generate(PROMPT, max_new_tokens=8, do_sample=False)
    assert not torch.equal(plain, cached), "this spec should change the greedy continuation"


def test_generation_modes_and_left_padding():
    model = tiny_model("llama")
    spec = spec_for(model, [(1, 2, "set", 5.0)])
    short = torch.tensor([[9, 4, 22]])
    batch = torch.tensor([[0, 0, 0, 9, 4, 22], PROMPT[0].tolist()])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    with steering(model, spec):
        alone = [model.generate(p, max_new_tokens=6, min_new_tokens=6, do_sample=False)[0, -6:] for p in (short, PROMPT)]
        padded = model.generate(batch, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)[:, -6:]
    adapter = Adapter(model)
    forced = int(adapter.readout(adapter.value_vectors(1)[2][None]).argmax())  # what L1.N2 promotes
    strong = spec_for(model, [(1, 2, "set", 3000.0)])  # so strong that it decides every greedy/beam token
    with steering(model, strong):
        torch.manual_seed(0)
        sampled = model.generate(PROMPT, max_new_tokens=6, min_new_tokens=6, do_sample=True, top_p=0.9,
                                 num_return_sequences=3, output_logits=True, return_dict_in_generate=True)
        beams = model.generate(PROMPT, max_new_tokens=6, min_new_tokens=6, do_sample=False, num_beams=3)
    assert torch.equal(padded[0], alone[0]) and torch.equal(padded[1], alone[1])
    assert sampled.sequences.shape == (3, 12) and beams.shape == (1, 12)
    assert (beams[:, 6:] == forced).all()  # steered, not only shaped
    # every sampled step's logits are the steered model's for that prefix, not the plain model's
    with steering(model, strong):
        steered_logits = torch.stack([model(sampled.sequences[:, :6 + t]).logits[:, -1] for t in range(6)], 1)
    plain_logits = torch.stack([model(sampled.sequences[:, :6 + t]).logits[:, -1] for t in range(6)], 1)
    torch.testing.assert_close(torch.stack(sampled.logits, 1), steered_logits, rtol=1e-4, atol=1e-4)
    assert (steered_logits - plain_logits).abs().max() > 0.1
    assert no_hooks(model)


def test_per_row_specs_match_each_spec_alone():
    model = tiny_model("llama")
    a = spec_for(model, [(0, 1, "set", 6.0)], "a")
    b = spec_for(model, [(1, 7, "scale", -3.0), (0, 1, "add", 1.0)], "b")
    batch = PROMPT.repeat(3, 1)
    with steering(model, [a, b, None]):
        mixed = logits_of(model, batch)
    for row, spec in enumerate((a, b)):
        with steering(model, spec):
            torch.testing.assert_close(mixed[row], logits_of(model)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[2], logits_of(model)[0], atol=1e-5, rtol=1e-5)
    # beams repeat each row: the per-row spec follows its row
    with steering(model, [a, b]):
        out = model.generate(PROMPT.repeat(2, 1), max_new_tokens=5, num_beams=2, do_sample=False)
    for row, spec in enumerate((a, b)):
        with steering(model, spec):
            assert torch.equal(out[row], model.generate(PROMPT, max_new_tokens=5, num_beams=2, do_sample=False)[0])


def test_processor_steers_prompt_and_detaches():
    model = tiny_model("gpt2")
    spec = spec_for(model, [(0, 3, "set", 4.0), (1, 9, "scale", -2.0)])
    with steering(model, spec):
        expected = model.generate(PROMPT, max_new_tokens=8, do_sample=False)
    processor = SteeringProcessor(model, spec)
    got = model.generate(PROMPT, max_new_tokens=8, do_sample=False, logits_processor=[processor])
    assert torch.equal(got, expected)
    assert no_hooks(model) and not processor.active
    assert not torch.equal(model.generate(PROMPT, max_new_tokens=8, do_sample=False), expected)
    # built inline, after `model.generate` was looked up: still attached before the prompt's forward
    inline = model.generate(PROMPT, max_new_tokens=8, do_sample=False,
                            logits_processor=[SteeringProcessor(model, spec)])
    assert torch.equal(inline, expected) and no_hooks(model)


class Boom(StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        raise KeyboardInterrupt


def test_no_hooks_left_after_exception_in_generate():
    model = tiny_model("llama")
    spec = spec_for(model, [(0, 3, "set", 4.0)])
    processor = SteeringProcessor(model, spec)
    with pytest.raises(KeyboardInterrupt):
        model.generate(PROMPT, max_new_tokens=4, logits_processor=[processor],
                       stopping_criteria=StoppingCriteriaList([Boom()]))
    assert no_hooks(model) and not processor.active
    with pytest.raises(KeyboardInterrupt), steering(model, spec):
        model.generate(PROMPT, max_new_tokens=4, stopping_criteria=StoppingCriteriaList([Boom()]))
    assert no_hooks(model)


def test_nothing_keeps_model_alive_after_use():
    model = tiny_model("llama")
    spec = spec_for(model, [(0, 3, "set", 4.0)])
    processor = SteeringProcessor(model, spec)
    model.generate(PROMPT, max_new_tokens=3, logits_processor=[processor])
    with steering(model, spec):
        logits_of(model)
    ref = weakref.ref(model)
    del model, processor
    gc.collect()
    assert ref() is None


def test_processor_for_another_model_is_refused():
    model, other = tiny_model("llama"), tiny_model("llama", seed=1)
    processor = SteeringProcessor(other, spec_for(other, [(0, 1, "set", 1.0)]))
    SteeringProcessor(model, spec_for(model, [(0, 1, "set", 1.0)]))
    with pytest.raises(ValueError, match="another model"):
        model.generate(PROMPT, max_new_tokens=2, logits_processor=[processor])


@pytest.mark.parametrize(
    "edits, message",
    [
        ([(2, 0, "set", 1.0)], "unknown layer 2"),
        ([(0, 64, "set", 1.0)], "index 64 out of range"),
        ([(0, 1, "double", 1.0)], "unknown op 'double'"),
        ([(0, 1, "set", math.nan)], "must be finite"),
        ([(0, 1, "set", math.inf)], "must be finite"),
        ([("L0.X1", "set", 1.0)], "bad value-vector name"),
    ],
)
def test_bad_specs_get_clear_errors(edits, message):
    model = tiny_model("llama")
    with pytest.raises((SpecError, ValueError), match=message):
        spec_for(model, edits)


def test_spec_for_another_model_shape_is_refused():
    small, wide = tiny_model("llama"), tiny_model("llama", intermediate_size=96)
    spec = spec_for(small, [(0, 1, "set", 1.0)])
    with pytest.raises(SpecError, match="was made for"):
        with steering(wide, spec):
            pass
