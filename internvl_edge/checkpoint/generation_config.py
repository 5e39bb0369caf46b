"""generation_config.json: a checkpoint's decoding defaults, read the same way by the converter (its stop
token ids go into the manifest) and by the API (sampling defaults and stop strings; the bundle keeps a
copy of the file in its config folder).

Keys the file leaves out, or sets to null, take transformers' GenerationConfig defaults (sampling.py).
https://github.com/huggingface/transformers/blob/main/src/transformers/generation/configuration_utils.py
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..errors import UserError, reason
from ..sampling import (
    DEFAULT_REPETITION_PENALTY,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    SamplingParams,
)

FILE_NAME = "generation_config.json"


@dataclass(frozen=True)
class GenerationDefaults:
    temperature: float = DEFAULT_TEMPERATURE
    top_k: int = DEFAULT_TOP_K
    top_p: float = DEFAULT_TOP_P
    repetition_penalty: float = DEFAULT_REPETITION_PENALTY
    stop_strings: tuple[str, ...] = ()
    eos_token_ids: tuple[int, ...] = ()

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p, self.repetition_penalty)


def parse_generation_config(data: object, source: str = FILE_NAME) -> GenerationDefaults:
    """The decoding defaults in a generation_config.json's parsed content (anything but an object holds
    none). A value of the wrong type is a UserError naming `source` and the key."""
    if not isinstance(data, dict):
        return GenerationDefaults()
    numbers = {}
    for key, kind in (("temperature", float), ("top_k", int), ("top_p", float), ("repetition_penalty", float)):
        value = data.get(key)
        if value is None:
            continue
        try:
            numbers[key] = kind(value)
        except (TypeError, ValueError):
            raise UserError(f"{source}: `{key}` must be a number, got {value!r}") from None
    stops = data.get("stop_strings") or ()
    eos = data.get("eos_token_id")
    return GenerationDefaults(
        **numbers,
        stop_strings=(stops,) if isinstance(stops, str) else tuple(stops),
        eos_token_ids=(eos,) if isinstance(eos, int) else tuple(eos or ()),
    )


def read_generation_config(folder: str) -> GenerationDefaults:
    """The defaults in `folder`'s generation_config.json (transformers' own when there is none)."""
    path = os.path.join(folder, FILE_NAME)
    if not os.path.isfile(path):
        return GenerationDefaults()
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {reason(e)}") from None
    return parse_generation_config(data, path)
