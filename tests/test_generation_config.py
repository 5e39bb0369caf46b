"""generation_config.json, read once for the converter and the API: defaults where the file is silent,
its eos ids and stop strings in either spelling, and one-line errors for a file or value that is wrong."""

from __future__ import annotations

import pytest

from internvl_edge.checkpoint.generation_config import (
    GenerationDefaults,
    parse_generation_config,
    read_generation_config,
)
from internvl_edge.errors import UserError
from internvl_edge.sampling import SamplingParams


def test_a_silent_file_takes_transformers_defaults(tmp_path):
    for data in ({}, [], None, {"temperature": None, "top_k": None, "eos_token_id": None}):
        assert parse_generation_config(data) == GenerationDefaults()
    assert GenerationDefaults().sampling == SamplingParams(temperature=1.0, top_k=50, top_p=1.0, repetition_penalty=1.0)
    assert read_generation_config(str(tmp_path)) == GenerationDefaults()  # no file at all


def test_values_eos_ids_and_stop_strings():
    data = {"temperature": 0.7, "top_k": "20", "top_p": 0.8, "repetition_penalty": 1, "eos_token_id": [7, 3]}
    parsed = parse_generation_config({**data, "stop_strings": ["###", "END"], "bos_token_id": 1})
    assert parsed.sampling == SamplingParams(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.0)
    assert isinstance(parsed.top_k, int) and isinstance(parsed.repetition_penalty, float)
    assert parsed.eos_token_ids == (7, 3) and parsed.stop_strings == ("###", "END")
    one = parse_generation_config({"eos_token_id": 5, "stop_strings": "###"})  # a single id, a single string
    assert one.eos_token_ids == (5,) and one.stop_strings == ("###",)


def test_wrong_values_and_files_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match=r"^gen\.json: `top_k` must be a number, got 'many'$"):
        parse_generation_config({"top_k": "many"}, "gen.json")
    (tmp_path / "generation_config.json").write_text('{"temperature": 0.7,')
    with pytest.raises(UserError, match=r"generation_config\.json: not valid JSON \(line 1"):
        read_generation_config(str(tmp_path))
    (tmp_path / "generation_config.json").write_text('{"temperature": 0.5, "stop_strings": "x"}')
    assert read_generation_config(str(tmp_path)) == GenerationDefaults(temperature=0.5, stop_strings=("x",))
