"""Layer ops (skip, reorder, parallel, repeat): exactness against rebuilt models, KV cache, specs, cleanup."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import TINY_CONFIGS, tiny_model
from steer import Adapter, Spec, SpecError, SteeringProcessor, steering
from steer.layers import LayerOp, executed_layers, layer_ops, layer_types

FAMILIES = sorted(TINY_CONFIGS)
# Left padding in row 0: a cache slot read at the wrong length then gives a wrong mask or wrong positions.
IDS = torch.tensor([[0, 0, 0, 8, 61, 12, 40, 41], [5, 17, 33, 8, 61, 12, 40, 41]])
MASK = (IDS != 0).long()


pytestmark = pytest.mark.usefixtures("one_thread")


def four_layers(model_type: str, seed: int = 0):
    return tiny_model(model_type, seed, layers=4)


def rebuild(model, order: list[int]):
    """A model *built* with layers ``order`` of ``model`` (a fresh config and a remapped state dict)."""
    adapter = Adapter(model)
    prefix = adapter.family.layers + "."
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(order)
    if getattr(config, "layer_types", None) is not None:
        types, _ = layer_types(model)
        config.layer_types = [types[i] for i in order]
    built = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}
    for position, layer in enumerate(order):
        state.update({f"{prefix}{position}.{k}": v for k, v in adapter.layers[layer].state_dict().items()})
    built.load_state_dict(state, strict=True)
    return built


def logits(model, ids=IDS, mask=MASK):
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


def greedy(model, n=6):
    with torch.no_grad():
        return model.generate(IDS, attention_mask=MASK, max_new_tokens=n, do_sample=False, pad_token_id=0)


def greedy_without_cache(model, n=6):
    """Greedy decoding by full forwards (no KV cache): what cached generation must reproduce."""
    ids, mask = IDS, MASK
    for _ in range(n):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() derives them for left padding
        with torch.no_grad():
            out = model(ids, attention_mask=mask, position_ids=positions, use_cache=False)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids


def untouched(model) -> bool:
    layers = Adapter(model).layers
    idx = [m.layer_idx for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    return all("forward" not in vars(layer) for layer in layers) and idx == sorted(idx)


@pytest.mark.parametrize("family", FAMILIES)
def test_skip_equals_model_built_without_the_layer(family):
    model = four_layers(family)
    for k in range(4):
        built = rebuild(model, [i for i in range(4) if i != k])
        with layer_ops(model, [LayerOp.skip(k)]):
            assert torch.equal(logits(model), logits(built)), f"skip {k}"
            assert torch.equal(greedy(model), greedy(built)), f"skip {k} in generate"
    assert untouched(model)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox", "opt", "phi", "qwen2"])
@pytest.mark.parametrize("ops, order", [
    ([LayerOp.skip(0, 2)], [1, 3]),
    ([LayerOp.reorder(1, 3, [3, 1, 2])], [0, 3, 1, 2]),
    ([LayerOp.repeat(1, 3)], [0, 1, 1, 1, 2, 3]),
    ([LayerOp.repeat(0, 2), LayerOp.skip(3)], [0, 0, 1, 2]),
])
def test_reorder_repeat_and_skips_equal_rebuilt_models(family, ops, order):
    model = four_layers(family)
    built = rebuild(model, order)
    with layer_ops(model, ops):
        assert torch.equal(logits(model), logits(built))
        assert torch.equal(greedy(model), greedy(built))  # own cache slot for every execution
    assert executed_layers(ops, 4) == order
    assert untouched(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_range_of_one_is_identity(family):
    model = four_layers(family)
    bare, bare_tokens = logits(model), greedy(model)
    for op in (LayerOp.parallel(2, 2), LayerOp.reorder(1, 1, [1]), LayerOp.repeat(3, 1)):
        with layer_ops(model, [op]):
            assert torch.equal(logits(model), bare), str(op)
            assert torch.equal(greedy(model), bare_tokens), str(op)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_parallel_averages_outputs_from_one_input(family):
    model = four_layers(family, seed=1)
    layers = Adapter(model).layers
    seen = {}
    handle = layers[1].register_forward_pre_hook(lambda m, a, kw: seen.update(args=a, kwargs=kw), with_kwargs=True)
    with torch.no_grad():
        model(IDS, attention_mask=MASK, use_cache=False)
        handle.remove()
        args, kwargs = seen["args"], seen["kwargs"]
        expected = (layers[1](*args, **kwargs) + layers[2](*args, **kwargs)) / 2
        after = {}
        handle = layers[2].register_forward_hook(lambda m, a, kw, out: after.update(out=out), with_kwargs=True)
        with layer_ops(model, [LayerOp.parallel(1, 2)]):
            model(IDS, attention_mask=MASK, use_cache=False)
        handle.remove()
    torch.testing.assert_close(after["out"], expected, rtol=1e-6, atol=1e-6)  # position 2 passes it through


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_cache_matches_forward_without_cache(family):
    model = four_layers(family, seed=2)
    plans = [[], [LayerOp.skip(0)], [LayerOp.skip(1, 2)], [LayerOp.repeat(2, 2)]]
    if family != "gemma2":  # its neighbours differ in attention type, so no range can run in parallel
        plans += [[LayerOp.parallel(1, 2)], [LayerOp.parallel(0, 1), LayerOp.repeat(3, 2)]]
    for ops in plans:
        with layer_ops(model, ops):
            assert torch.equal(greedy(model), greedy_without_cache(model)), ", ".join(map(str, ops))


def test_empty_spec_is_token_identical_to_plain_generate(any_tiny):
    model = any_tiny
    plain = greedy(model, n=8)
    with steering(model, Spec.build("empty", [], model=model)):
        assert torch.equal(greedy(model, n=8), plain)
    spec = Spec.build("noop", [], model=model, layers=[LayerOp.reorder(0, 0, [0])])
    processor = SteeringProcessor(model, spec)  # before looking up model.generate, which it wraps
    assert torch.equal(model.generate(IDS, attention_mask=MASK, max_new_tokens=8, do_sample=False, pad_token_id=0,
                                      logits_processor=[processor]), plain)


def test_spec_combines_layer_ops_and_value_edits():
    model = four_layers("llama")
    ops = [LayerOp.skip(2)]
    edits = [(1, 3, "set", 4.0), (3, 7, "scale", -2.0)]
    both = Spec.build("both", edits, model=model, layers=ops)
    with steering(model, both):
        combined = logits(model)
    with steering(model, Spec.build("edits", edits, model=model)), layer_ops(model, ops):
        nested = logits(model)
    with layer_ops(model, ops):
        ops_only = logits(model)
    assert torch.equal(combined, nested)
    assert not torch.allclose(combined, ops_only)
    assert untouched(model)


def test_restored_after_an_error_inside_the_block():
    model = four_layers("gpt2")
    bare = logits(model)
    with pytest.raises(RuntimeError, match="boom"):
        with layer_ops(model, [LayerOp.repeat(1, 2), LayerOp.skip(0)]):
            greedy(model)
            raise RuntimeError("boom")
    assert untouched(model)
    assert torch.equal(logits(model), bare)


def test_per_row_specs_must_share_layer_ops():
    model = four_layers("llama")
    a = Spec.build("a", [], model=model, layers=[LayerOp.skip(1)])
    b = Spec.build("b", [(0, 1, "scale", 0.0)], model=model)
    with pytest.raises(ValueError, match="share their layer ops"):
        with steering(model, [a, b]):
            pass
    with steering(model, [a, a.with_edits([])]):  # same ops on every row is fine
        assert logits(model).shape[0] == 2


def test_mixed_attention_types_refuse_moving_layers():
    model = four_layers("gemma2")  # sliding, full, sliding, full
    with pytest.raises(SpecError, match="mixes attention types"):
        with layer_ops(model, [LayerOp.reorder(0, 1, [1, 0])]):
            pass
    with pytest.raises(SpecError, match="mixes attention types"):
        Spec.build("p", [], model=model, layers=[LayerOp.parallel(1, 2)])
    with layer_ops(model, [LayerOp.reorder(0, 2, [2, 1, 0])]):  # same types: allowed
        assert torch.equal(logits(model), logits(rebuild(model, [2, 1, 0, 3])))


def test_nothing_is_left_behind():
    import gc
    import weakref

    model = four_layers("llama")
    with steering(model, Spec.build("s", [(1, 2, "set", 1.0)], model=model, layers=[LayerOp.repeat(2, 2)])):
        greedy(model, n=2)
    assert untouched(model)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_processor_applies_layer_ops_inside_generate():
    model = four_layers("qwen2", seed=3)
    spec = Spec.build("r", [], model=model, layers=[LayerOp.repeat(1, 2), LayerOp.skip(3)])
    processor = SteeringProcessor(model, spec)
    got = model.generate(IDS, attention_mask=MASK, max_new_tokens=6, do_sample=False, pad_token_id=0,
                         logits_processor=[processor])
    assert torch.equal(got, greedy(rebuild(model, [0, 1, 1, 2])))
    assert untouched(model)
