"""steer.inputs, the one place where prompts, files and numbers are checked: exact behaviour."""
from __future__ import annotations

import math

import pytest

from conftest import tiny_model, tiny_tokenizer
from steer.errors import MissingFileError, SteerError
from steer.inputs import (check_prompts, context_length, encode_prompt, integer, lines, load_data, number, read_text,
                          whole)
from test_eval_helpers import save_tiny_lm, tiny_lm


def test_read_text_names_file_line_and_byte(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"\xef\xbb\xbfone\r\ntwo\nthr\xffee\n")
    with pytest.raises(SteerError, match=r"p.txt:3: prompt file is not UTF-8 \(byte 0xff at column 4\); save it as UTF-8"):
        read_text(path, "prompt file")
    path.write_bytes(b"\xef\xbb\xbfone\r\ntwo\n\xe2\x80\xa8three\n")  # a BOM is dropped; U+2028 is not a line break
    assert lines(read_text(path, "prompt file")) == ["one", "two", "\u2028three"]
    with pytest.raises(MissingFileError, match="cannot read spec .*missing.json: not found"):
        read_text(tmp_path / "missing.json", "spec")
    with pytest.raises(SteerError, match="cannot read spec"):
        read_text(tmp_path, "spec")  # a folder


@pytest.mark.parametrize("name, content, message", [
    ("a.json", '{"a": 1, "b": {"c": 1, "c": 2}}', "key 'c' is given twice in one mapping"),
    ("a.yaml", "a: 1\nb:\n  c: 1\n  c: 2\n", "key 'c' is given twice in one mapping"),
    ("a.json", '{"a": [1, 2}', r"is not valid JSON: Expecting ',' delimiter at line 1, column 12"),
    ("a.yaml", "a: [1, 2\n", "is not valid YAML: .* at line 2, column 1"),
    ("a.json", "[" * 100_000, "nested too deeply"),
])
def test_load_data_refuses_what_parsers_take_silently_or_crash_on(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(SteerError, match=message) as caught:
        load_data(tmp_path / name, "spec")
    assert name in str(caught.value) and "\n" not in str(caught.value)


def test_yaml_merge_keys_still_work(tmp_path):
    (tmp_path / "m.yaml").write_text("base: &b {x: 1}\nuse:\n  <<: *b\n  y: 2\n")
    assert load_data(tmp_path / "m.yaml", "config")["use"] == {"x": 1, "y": 2}


def test_numbers():
    assert number(3, "v") == 3.0 and isinstance(number(3, "v"), float)
    for bad, message in ((math.nan, "v must be finite, got nan"), (math.inf, "finite"), (10**400, r"finite, got 1000.*\.\.\."),
                         (True, "must be a number"), ("2", "must be a number"), (None, "must be a number")):
        with pytest.raises(SteerError, match=message):
            number(bad, "v")
    with pytest.raises(SteerError, match=r"t must be between 0.0 and 1.0, got 1.5"):
        number(1.5, "t", low=0.0, high=1.0)
    assert whole(4, "n", low=1) == 4 and integer(4.0, "n") == 4
    for bad in (2.0, 2.5, True, "3"):
        with pytest.raises(SteerError, match="n must be a whole number"):
            whole(bad, "n")
    with pytest.raises(SteerError, match="n must be >= 1, got 0"):
        whole(0, "n", low=1)
    with pytest.raises(SteerError, match="must be a whole number, got 2.5"):
        integer(2.5, "n")


def test_context_length_reads_each_family():
    assert context_length(tiny_model("gpt2")) == 128  # n_positions
    assert context_length(tiny_lm()[0]) == 512  # max_position_embeddings


def test_encode_prompt_refuses_or_truncates_a_prompt_over_the_context():
    model, tokenizer = tiny_lm()
    inputs, note = encode_prompt(tokenizer, model, "Hi there", 10)
    assert inputs["input_ids"].shape == (1, 8) and note is None
    long = "ab" * 300  # 600 tokens; 512 positions
    with pytest.raises(SteerError, match="the prompt is 600 tokens; with 10 new tokens that is more than the model's "
                                         "context of 512 positions: shorten it, or truncate it to its last 502 tokens"):
        encode_prompt(tokenizer, model, long, 10)
    inputs, note = encode_prompt(tokenizer, model, long, 10, truncate=True)
    assert inputs["input_ids"].shape == (1, 502) and inputs["attention_mask"].shape == (1, 502)
    assert tokenizer.decode(inputs["input_ids"][0]) == long[-502:]  # the end of the prompt is kept
    assert note == ("prompt truncated to its last 502 of 600 tokens, to fit the model's context of 512 positions "
                    "with 10 new tokens")
    with pytest.raises(SteerError, match="ask for fewer than 512 new tokens"):
        encode_prompt(tokenizer, model, "Hi", 600, truncate=True)
    for text, message in (("", "the prompt is empty"), (" \n", "the prompt is only whitespace"), (3, "must be text")):
        with pytest.raises(SteerError, match=message):
            encode_prompt(tokenizer, model, text, 10)


def test_a_prompt_that_gives_no_tokens_is_refused():
    from tokenizers import normalizers

    tokenizer = tiny_tokenizer()
    tokenizer.backend_tokenizer.normalizer = normalizers.Replace("~", "")  # a normalizer that drops characters
    with pytest.raises(SteerError, match="prompt 1 gives no tokens with this tokenizer"):
        check_prompts(tokenizer, tiny_model("llama"), ["w5 w6", "~~~"], 4)
    with pytest.raises(SteerError, match="the prompt gives no tokens"):
        encode_prompt(tokenizer, tiny_model("llama"), "~", 4)


def test_cli_generate_truncates_only_when_asked_and_says_so(tmp_path, capsys):
    from steer.ui.cli import main

    folder = save_tiny_lm(tmp_path / "tiny")
    argv = ["generate", "ab" * 300, "--model", str(folder), "--max-new-tokens", "3"]
    assert main(argv) == 2
    assert "--truncate" in capsys.readouterr().err
    assert main(argv + ["--truncate"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "[prompt truncated to its last 509 of 600 tokens, to fit the model's context of 512 positions " \
                     "with 3 new tokens]" and " tokens in " in out[-1]
