"""Early exit inside generate: exactness when off, KV cache consistency, batching, steering, errors."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_model
from steer.generation import ExitModel, early_exit, fit_exit_model, load_exit_model
from steer.generation.probe import Probe
from steer.generation.exit_model import fingerprint
from steer.generation.fit import default_layers
from steer.generation.kv_schemes import SCHEMES, KVScheme
from steer.maps import LayerMaps, MapFitter
from steer import Adapter, Spec, model_name, steering
from steer.compat import CACHE_KWARG, cache_of, with_cache

PROMPT = torch.tensor([[5, 17, 33, 8, 61, 12]])
FAMILIES = ["llama", "gpt2"]


def deep(model_type: str, layers: int = 4, seed: int = 0):
    key = "n_layer" if model_type == "gpt2" else "num_hidden_layers"
    return tiny_model(model_type, seed=seed, **{key: layers})


def exit_model_for(model, check=(1, 2), seed: int = 0, bias: float = 0.0, scale: float = 0.0, maps=None,
                   feature_set: str = "direction") -> ExitModel:
    """An exit model without fitting: identity (or given) maps, a random linear classifier."""
    adapter = Adapter(model)
    d = adapter.unembed.weight.shape[1]
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(len(check), d + (6 if feature_set == "ffn" else 0), generator=g) * scale
    return ExitModel(model_name(model), fingerprint(model), adapter.n_layers, d, maps or LayerMaps.identity(list(check), d),
                     list(check), weight, torch.full((len(check),), bias), feature_set=feature_set)


def greedy(model, ids=PROMPT, n=8, **kw):
    mask = kw.pop("attention_mask", torch.ones_like(ids))
    return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)


def wrapped_state_is_clean(model) -> bool:
    return all("forward" not in m.__dict__ and "_steer_replaced_forward" not in m.__dict__ for m in Adapter(model).layers) and \
        all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("rule", ["classifier", "confidence"])
def test_threshold_one_never_exits_and_is_token_identical(model_type, rule):
    model = deep(model_type)
    plain = greedy(model, n=10)
    with early_exit(model, exit_model_for(model, bias=50.0), 1.0, rule=rule) as stats:
        out = greedy(model, n=10)
    assert torch.equal(out, plain)
    assert stats.tokens == 9 and stats.layers_saved_fraction == 0.0
    assert wrapped_state_is_clean(model)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_deferred_kv_cache_after_exit_is_the_full_models(model_type):
    """"defer": skipped layers are computed later, so the final cache equals the plain model's."""
    model = deep(model_type)
    exit_model = exit_model_for(model, check=(1,), bias=50.0)  # every new token exits after layer 1
    with early_exit(model, exit_model, 0.5) as stats:
        out = greedy(model, n=6, return_dict_in_generate=True)
    assert stats.tokens == 5 and stats.layers_saved_fraction == pytest.approx(2 / 4)
    assert stats.deferred == 5 * 2  # every exited position's layers 2-3 were computed later
    cache = cache_of(out)
    total = PROMPT.shape[1] + 6 - 1
    assert len(cache.layers) == 4
    assert all(layer.keys.shape[-2] == total and layer.values.shape[-2] == total for layer in cache.layers)
    with torch.no_grad():
        plain = cache_of(model(out.sequences[:, :total], use_cache=True))
    for mine, full in zip(cache.layers, plain.layers):
        torch.testing.assert_close(mine.keys, full.keys, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mine.values, full.values, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_calm_kv_cache_after_exit_has_every_layer_and_propagated_entries(model_type):
    model = deep(model_type)
    adapter = Adapter(model)
    exit_model = exit_model_for(model, check=(1,), bias=50.0)  # always exits after layer 1
    exited = []
    hook = adapter.layers[1].register_forward_hook(lambda m, a, out: exited.append(out.detach().clone()))
    with early_exit(model, exit_model, 0.5, propagate="hidden") as stats:
        out = greedy(model, n=6, return_dict_in_generate=True)
    hook.remove()
    assert stats.tokens == 5 and stats.layers_saved_fraction == pytest.approx(2 / 4) and stats.deferred == 0
    cache = cache_of(out)
    total = PROMPT.shape[1] + 6 - 1
    assert all(layer.keys.shape[-2] == total and layer.values.shape[-2] == total for layer in cache.layers)
    # The skipped layers' entries are what those layers compute from the exited state.
    position = total - 1
    reference = reference_kv(model, 3, exited[-1], position)
    torch.testing.assert_close(cache.layers[3].keys[..., position:, :], reference[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cache.layers[3].values[..., position:, :], reference[1], rtol=1e-4, atol=1e-5)


def reference_kv(model, layer: int, hidden: torch.Tensor, position: int):
    """What ``layer`` writes to a fresh cache for ``hidden`` at ``position`` (the stock forward, no early exit)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    adapter = Adapter(model)
    captured = {}

    def grab(module, args, kwargs):
        captured.update(kwargs=kwargs, args=args)
        raise StopIteration

    handle = adapter.layers[layer].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(torch.tensor([[3] * (position + 1)]))
    except StopIteration:
        pass
    finally:
        handle.remove()
    args = list(captured["args"][1:])
    kwargs = dict(captured["kwargs"])
    for key, value in list(kwargs.items()):
        if key == "position_embeddings":
            kwargs[key] = tuple(v[:, position:position + 1] for v in value)
        elif key == "position_ids" and value is not None:
            kwargs[key] = value[:, position:position + 1]
        elif key == "attention_mask":
            kwargs[key] = None
    kwargs[CACHE_KWARG] = cache
    kwargs["use_cache"] = True
    if model.config.model_type == "gpt2":
        args = []
        kwargs["position_ids"] = torch.tensor([[position]])
    with torch.no_grad():
        adapter.layers[layer](hidden, *args, **kwargs)
    return cache.layers[layer].keys, cache.layers[layer].values


@pytest.mark.parametrize("model_type,feature_set,propagate", [
    ("llama", "direction", "defer"), ("gpt2", "direction", "defer"), ("llama", "ffn", "defer"),
    ("llama", "direction", "hidden"), ("gpt2", "direction", "hidden")])
def test_batched_rows_exit_at_different_layers_and_match_single_rows(model_type, feature_set, propagate):
    model = deep(model_type, layers=5)
    exit_model = exit_model_for(model, check=(1, 2, 3), seed=3, scale=4.0, feature_set=feature_set)
    prompts = [[5, 17, 33, 8, 61, 12], [9, 40, 2 + 70], [44, 13, 27, 81, 6]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with early_exit(model, exit_model, 0.5, propagate=propagate) as batch_stats:
        batched = greedy(model, ids, n=8, attention_mask=mask)
    assert len(batch_stats.exit_layers) >= 2, "the rule should send rows to different layers"
    assert batch_stats.layers_saved_fraction <= batch_stats.wanted_saved_fraction
    wanted = 0.0
    for row, prompt in enumerate(prompts):
        with early_exit(model, exit_model, 0.5, propagate=propagate) as stats:
            single = greedy(model, torch.tensor([prompt]), n=8)
        assert torch.equal(batched[row, width:], single[0, len(prompt):]), f"row {row} differs"
        assert stats.layers_saved_fraction == pytest.approx(stats.wanted_saved_fraction)
        wanted += stats.wanted_saved_fraction * stats.tokens
    assert batch_stats.wanted_saved_fraction == pytest.approx(wanted / batch_stats.tokens)


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_a_kv_scheme_instance_equals_its_name(model_type, name):
    """``propagate=`` takes a scheme object as well as its name: the same tokens, stats and cache,
    and one object serves several blocks."""
    model = deep(model_type, layers=5)
    exit_model = exit_model_for(model, check=(1, 2, 3), seed=3, scale=4.0)
    prompts = [[5, 17, 33, 8, 61, 12], [9, 40, 2 + 70], [44, 13, 27, 81, 6]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    scheme = SCHEMES[name]()
    runs = []
    for propagate in (name, scheme, scheme):
        with early_exit(model, exit_model, 0.5, propagate=propagate) as stats:
            out = greedy(model, ids, n=8, attention_mask=mask, return_dict_in_generate=True)
        runs.append((out.sequences, stats, cache_of(out)))
    assert len(runs[0][1].exit_layers) >= 2, "the rule should send rows to different layers"
    for tokens, stats, cache in runs[1:]:
        assert torch.equal(tokens, runs[0][0]) and stats == runs[0][1]
        for mine, by_name in zip(cache.layers, runs[0][2].layers):
            assert torch.equal(mine.keys, by_name.keys) and torch.equal(mine.values, by_name.values)
    with pytest.raises(ValueError, match="propagate must be one of defer, hidden, mapped, recompute, not 'magic'"):
        with early_exit(model, exit_model, 0.5, propagate="magic"):
            pass
    with pytest.raises(ValueError, match="KVScheme is the base of the schemes"):
        with early_exit(model, exit_model, 0.5, propagate=KVScheme()):
            pass


@pytest.mark.parametrize("model_type,propagate", [("llama", "defer"), ("gpt2", "defer"), ("llama", "hidden"),
                                                  ("gpt2", "hidden")])
def test_teacher_forced_all_positions_equals_token_by_token_decoding(model_type, propagate):
    model = deep(model_type, layers=5)
    exit_model = exit_model_for(model, check=(1, 2, 3), seed=5, scale=4.0)
    ids = torch.tensor([[5, 17, 33, 8, 61, 12, 40, 2 + 70, 44, 13]])
    with torch.no_grad():
        with early_exit(model, exit_model, 0.5, positions="all", propagate=propagate) as stats:
            parallel = model(ids).logits
        steps = []
        with early_exit(model, exit_model, 0.5, propagate=propagate) as step_stats:
            out = model(ids[:, :1], use_cache=True)
            steps.append(out.logits)
            for t in range(1, ids.shape[1]):
                out = model(**with_cache(cache_of(out), input_ids=ids[:, t:t + 1], use_cache=True))
                steps.append(out.logits)
    assert stats.tokens == ids.shape[1] and len(stats.exit_layers) >= 2
    assert step_stats.exit_layers == stats.exit_layers
    torch.testing.assert_close(torch.cat(steps, 1), parallel, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_steering_and_early_exit_together(model_type):
    """Steering edits the layers that run; early exit skips the rest and reads out the steered state."""
    model = deep(model_type)
    adapter = Adapter(model)
    spec = Spec.build("push", [(0, 3, "set", 6.0), (1, 5, "scale", -2.0)], model=model)
    maps = LayerMaps.identity([1], adapter.unembed.weight.shape[1])
    maps.weight[0] += 0.05 * torch.randn(maps.weight.shape[1:], generator=torch.Generator().manual_seed(1))
    exit_model = exit_model_for(model, check=(1,), bias=50.0, maps=maps)  # every new token exits after layer 1
    with steering(model, spec), early_exit(model, exit_model, 0.5) as stats:
        both = greedy(model, n=5)
    with early_exit(model, exit_model, 0.5):
        exit_only = greedy(model, n=5)
    assert stats.layers_saved_fraction == pytest.approx(0.5)  # early exit's promise: layers 2-3 skipped
    assert not torch.equal(both, exit_only)  # steering's promise: the edits change what is generated
    # Each token is the read-out of the *steered* layer-1 state, mapped: check against a steered full pass.
    # (The first new token comes from the prompt's pass, which is computed in full.)
    layer1 = {}
    handle = adapter.layers[1].register_forward_hook(lambda m, a, out: layer1.update(h=out.detach().clone()))
    with torch.no_grad(), steering(model, spec):
        full = model(both[:, :-1]).logits.argmax(-1)[0, PROMPT.shape[1] - 1:]
    handle.remove()
    expected = adapter.readout(maps.apply(1, layer1["h"])).argmax(-1)[0, PROMPT.shape[1] - 1:]
    assert both[0, PROMPT.shape[1]] == full[0]
    assert torch.equal(both[0, PROMPT.shape[1] + 1:], expected[1:])
    # A never-firing exit leaves steering exactly as it was.
    with steering(model, spec):
        steered = greedy(model, n=6)
        with early_exit(model, exit_model, 1.0):
            assert torch.equal(greedy(model, n=6), steered)
    assert wrapped_state_is_clean(model)


def test_everything_is_restored_after_an_error():
    model = deep("llama")
    with pytest.raises(RuntimeError, match="boom"):
        with early_exit(model, exit_model_for(model, bias=50.0), 0.5):
            greedy(model, n=2)
            raise RuntimeError("boom")
    assert wrapped_state_is_clean(model)
    with pytest.raises(RuntimeError, match="already active"):
        with early_exit(model, exit_model_for(model), 0.5), early_exit(model, exit_model_for(model), 0.5):
            pass
    assert wrapped_state_is_clean(model)


def test_bad_input_gets_clear_errors(tmp_path):
    model, other = deep("llama"), deep("llama", seed=1)
    exit_model = exit_model_for(model)
    with pytest.raises(ValueError, match="fitted for .*not for"):
        with early_exit(other, exit_model, 0.5):
            pass
    for bad in (1.5, -0.1, math.nan, "0.5"):
        with pytest.raises(ValueError, match=r"threshold must be a number in \[0, 1\]"):
            with early_exit(model, exit_model, bad):
                pass
    with pytest.raises(ValueError, match="unknown exit rule"):
        with early_exit(model, exit_model, 0.5, rule="magic"):
            pass
    with pytest.raises(ValueError, match="too short"):
        fit_exit_model(model, CharTokenizer(), "only a few words", min_tokens=256)
    with pytest.raises(ValueError, match="exit classifier has shape"):
        ExitModel("m", "f", 4, 32, LayerMaps.identity([1], 32), [1], torch.zeros(1, 32), torch.zeros(1), feature_set="ffn")
    with pytest.raises(FileNotFoundError, match="not an exit model folder"):
        load_exit_model(tmp_path)


class CharTokenizer:
    """Bytes -> ids below the tiny vocabulary; enough for fitting on tiny models."""

    def __call__(self, text, add_special_tokens=False, return_tensors="pt"):
        class Out:
            input_ids = torch.tensor([[3 + b % 90 for b in text.encode()]])
        return Out()


def test_fit_save_load_and_exit_on_tiny_model(tmp_path):
    model = deep("llama", layers=4)
    text = " ".join(f"word{i % 37} is followed by word{(i * 7) % 37}." for i in range(200))
    assert default_layers(30) == [7, 10, 13, 16, 19, 22, 25, 28] and default_layers(4) == [2]
    exit_model = fit_exit_model(model, CharTokenizer(), text, layers=[1, 2], chunk=64, max_tokens=2048, min_tokens=512)
    assert exit_model.check_layers == [1, 2] and exit_model.weight.shape == (2, 128)
    assert exit_model.probe is not None and exit_model.probe.width == (32, 128)
    assert 0.0 <= exit_model.default_threshold <= 1.0
    calib = exit_model.info["calibration"]
    assert calib[-1][1] == 0.0 and calib[-1][2] == 1.0  # threshold 1: nothing saved, full agreement
    assert calib[0][1] > 0.0  # threshold 0: everything exits at the first check
    exit_model.save(tmp_path / "em")
    loaded = load_exit_model(tmp_path / "em")
    torch.testing.assert_close(loaded.weight, exit_model.weight)
    features = torch.randn(5, 32)
    torch.testing.assert_close(loaded.log_odds(features, 1), exit_model.log_odds(features, 1))
    torch.testing.assert_close(loaded.maps.weight, exit_model.maps.weight)
    with early_exit(model, loaded, 0.0) as stats:
        greedy(model, n=4)
    assert stats.layers_saved_fraction == pytest.approx(2 / 4)


def test_least_squares_map_recovers_an_affine_map():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 8, generator=g)
    a, b = torch.randn(8, 8, generator=g), torch.randn(8, generator=g)
    fitter = MapFitter(8, ridge=0.0)
    fitter.add(3, x[:250], x[:250] @ a + b)
    fitter.merge(MapFitter(8, ridge=0.0))
    other = MapFitter(8, ridge=0.0)
    other.add(3, x[250:], x[250:] @ a + b)
    maps = fitter.merge(other).solve()
    torch.testing.assert_close(maps.apply(3, x[:5]), x[:5] @ a + b, rtol=1e-4, atol=1e-4)
    with pytest.raises(KeyError, match="no map was fitted for layer 4"):
        maps.apply(4, x[:1])


@pytest.mark.embedded
def test_embedded_exit_off_is_identical_and_batches_match(embedded):
    model, tokenizer = embedded
    exit_model = exit_model_for(model, check=(20, 24, 27), seed=0, scale=3.0, bias=2.0,  # rows exit at 20, 24 or not
                                maps=LayerMaps.identity([20, 24, 27], 576))
    prompts = ["The function returns", "Raise an error when the file"]
    single = tokenizer(prompts[0], return_tensors="pt")
    plain = greedy(model, single.input_ids, n=6, attention_mask=single.attention_mask)
    with early_exit(model, exit_model, 1.0):
        assert torch.equal(greedy(model, single.input_ids, n=6, attention_mask=single.attention_mask), plain)
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with early_exit(model, exit_model, 0.3) as stats:
        batched = greedy(model, batch.input_ids, n=6, attention_mask=batch.attention_mask)
    assert len(stats.exit_layers) >= 2 and stats.wanted_saved_fraction > 0.05
    for row, prompt in enumerate(prompts):
        ids = tokenizer(prompt, return_tensors="pt")
        with early_exit(model, exit_model, 0.3):
            alone = greedy(model, ids.input_ids, n=6, attention_mask=ids.attention_mask)
        assert torch.equal(batched[row, -6:], alone[0, -6:])


@pytest.mark.parametrize("feature_set,mlp", [("direction", False), ("ffn", False), ("direction", True), ("ffn", True)])
def test_fit_time_features_equal_run_time_features(feature_set, mlp, monkeypatch):
    """The classifier must see at run time exactly the features it was fitted on (layer 0 included)."""
    from steer.generation.fit import record
    from steer.generation.rules import ClassifierRule

    model = deep("llama", layers=3)
    exit_model = exit_model_for(model, check=(0, 1), seed=2, scale=1.0, bias=-50.0, feature_set=feature_set)
    if mlp:  # a random MLP body with 16 hidden units in front of random heads
        g = torch.Generator().manual_seed(4)
        width = exit_model.weight.shape[1]
        exit_model.probe = Probe(torch.randn(width, generator=g), torch.rand(width, generator=g) + 0.5,
                                 torch.randn(width, 16, generator=g), torch.randn(16, generator=g),
                                 torch.randn(2, 16, generator=g), torch.randn(16, 16, generator=g) / 4,
                                 torch.randn(16, generator=g))
        exit_model.weight = torch.randn(2, 16, generator=g)
    ids = torch.tensor([[5, 17, 33, 8, 61, 12, 40, 70]])
    records = record(model, [ids], [0, 1])
    with torch.no_grad():
        offline = torch.stack([exit_model.log_odds(torch.tensor(records.features(j, feature_set)), j)
                               for j in range(2)], 1)
    seen = {}
    original = ClassifierRule.logits

    def spy(self, layer, h_in, h_out, ffn):
        seen[layer] = original(self, layer, h_in, h_out, ffn)
        return seen[layer]

    monkeypatch.setattr(ClassifierRule, "logits", spy)
    with torch.no_grad(), early_exit(model, exit_model, 0.5, positions="all") as stats:
        model(ids)
    assert stats.layers_saved_fraction == 0.0  # bias -50: no exit, both layers see every position
    torch.testing.assert_close(torch.stack([seen[0][0], seen[1][0]], 1), offline, rtol=1e-4, atol=1e-3)


def test_cli_rejects_bad_thresholds_before_loading_anything(tmp_path, capsys):
    from steer.ui.cli import main

    exit_model_for(deep("llama")).save(tmp_path / "em")
    assert main(["early-exit", "eval", "--exit-model", str(tmp_path / "em"), "--thresholds", "classifier=1.5"]) == 2
    assert "threshold must be a number in [0, 1]" in capsys.readouterr().err
    assert main(["early-exit", "eval", "--exit-model", str(tmp_path / "em"), "--thresholds", "magic=0.5"]) == 2
    assert "RULE=T1,T2" in capsys.readouterr().err


@pytest.mark.embedded
def test_cli_generate_with_early_exit_and_steering(embedded, tmp_path, capsys):
    from steer.ui.cli import main

    model, tokenizer = embedded
    exit_model_for(model, check=(20, 24), bias=50.0, maps=LayerMaps.identity([20, 24], 576)).save(tmp_path / "em")
    Spec.build("help", [("L22.N888", "set", 8.0), ("L20.N630", "set", 8.0)], model=model).save(tmp_path / "spec.json")
    base = ["generate", "The old man looked at the stranger and said", "--max-new-tokens", "8"]
    assert main(base) == 0
    plain = capsys.readouterr().out.splitlines()[0]
    assert main(base + ["--intervention", str(tmp_path / "spec.json")]) == 0
    steered = capsys.readouterr().out.splitlines()[0]
    assert steered != plain  # the spec changes the output ...
    assert main(base + ["--early-exit", str(tmp_path / "em"), "--threshold", "1", "--intervention",
                        str(tmp_path / "spec.json")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == steered and "saved 0.0%" in out[-1]  # ... and composes with early exit that never exits
    assert main(base + ["--early-exit", str(tmp_path / "em"), "--threshold", "0.5"]) == 0
    assert "saved 30.0%" in capsys.readouterr().out  # exits after layer 20 of 30: 9 layers skipped
    assert main(base + ["--early-exit", str(tmp_path / "em"), "--threshold", "1.5"]) == 2
    assert "argument --threshold: the value must be between 0.0 and 1.0, got 1.5" in capsys.readouterr().err


@pytest.mark.parametrize("hidden", [0, 16])
def test_train_probe_learns_and_its_validation_log_odds_are_what_the_model_computes(hidden):
    """A label that depends on the features nonlinearly per layer; the returned exit model reproduces
    the validation predictions the threshold is calibrated on (folded standardisation included)."""
    from steer.generation.probe import train_probe

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 2, 8, generator=g) * 3 + 1
    y = torch.stack([x[:, 0, 0] > 1, (x[:, 1, 1] + x[:, 1, 2]) > 2], 1)
    probe, weight, bias, val, val_logodds = train_probe(x, y, hidden=hidden, epochs=30)
    assert (probe is None) == (hidden == 0) and weight.shape == (2, hidden or 8)
    exit_model = ExitModel("m", "f", 4, 8, LayerMaps.identity([1, 2], 8), [1, 2], weight, bias, probe=probe)
    with torch.no_grad():
        again = torch.stack([exit_model.log_odds(x[val, j], j) for j in range(2)], 1)
    torch.testing.assert_close(again, torch.from_numpy(val_logodds), rtol=1e-4, atol=1e-4)
    accuracy = ((again > 0) == y[val]).float().mean(0)
    assert (accuracy > 0.88).all(), accuracy  # chance: 0.5
    with pytest.raises(ValueError, match="too few tokens"):
        train_probe(x[:10], y[:10])
