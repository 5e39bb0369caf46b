"""The Python API: images as paths, bytes or PIL images; OpenAI-format messages; what a Result and a
stream carry; one-line errors for bad input."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from PIL import Image

import internvl_edge
from internvl_edge.errors import UserError
from internvl_edge.messages import decode_data_url, resolve_image


@pytest.fixture(scope="module")
def model(bundle):
    return internvl_edge.load(bundle("tiny_bf16", "w4bf16"))


def data_url(path: str, mime: str = "image/png") -> str:
    with open(path, "rb") as f:
        return f"data:{mime};base64," + base64.b64encode(f.read()).decode()


def test_images_as_paths_bytes_or_pil(model, images):
    path = images["wide"]
    with open(path, "rb") as f:
        raw = f.read()
    by_path = model.generate("Describe the image.", images=[path], max_new_tokens=6, ignore_eos=True)
    by_bytes = model.generate("Describe the image.", images=[raw], max_new_tokens=6, ignore_eos=True)
    by_pil = model.generate("Describe the image.", images=[Image.open(path)], max_new_tokens=6, ignore_eos=True)
    assert by_path.token_ids == by_bytes.token_ids == by_pil.token_ids
    assert by_path.prompt_token_ids == by_bytes.prompt_token_ids == by_pil.prompt_token_ids
    assert by_path.prompt_token_ids.count(model.tokens["img_context"]) == 3 * 256  # 2x1 tiles + thumbnail


def test_messages_equal_prompt_and_images(model, images):
    messages = [
        {"role": "system", "content": "You are terse."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Describe the image."},
                {"type": "image_url", "image_url": {"url": data_url(images["square"])}},
            ],
        },
    ]
    by_messages = model.generate(messages=messages, max_new_tokens=8, logprobs=2)
    by_prompt = model.generate(
        "Describe the image.", images=[images["square"]], system="You are terse.", max_new_tokens=8, logprobs=2
    )
    assert by_messages.prompt_token_ids == by_prompt.prompt_token_ids
    assert by_messages.token_ids == by_prompt.token_ids and by_messages.text == by_prompt.text
    # a plain string content and the Python-only image part
    plain = model.generate(messages=[{"role": "user", "content": "Hi"}], max_new_tokens=3)
    assert plain.prompt_token_ids == model.generate("Hi", max_new_tokens=3).prompt_token_ids
    pil = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": Image.open(images["square"])},
                {"type": "text", "text": "Describe the image."},
            ],
        }
    ]
    assert (
        model.generate(messages=pil, max_new_tokens=3).prompt_token_ids
        == model.generate("Describe the image.", images=[images["square"]], max_new_tokens=3).prompt_token_ids
    )


def test_multi_turn_messages_make_the_chat_template(model, images):
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": data_url(images["square"])},
                {"type": "text", "text": "What is it?"},
            ],
        },
        {"role": "assistant", "content": "A square."},
        {"role": "user", "content": "And its colour?"},
        {"role": "user", "content": [{"type": "text", "text": "One word."}]},
    ]
    text, found = model.messages_prompt(messages)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\nA square.<|im_end|>\n"
        "<|im_start|>user\nAnd its colour?\nOne word.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert len(found) == 1 and found[0] == open(images["square"], "rb").read()
    r = model.generate(messages=messages, max_new_tokens=2)
    assert r.prompt_token_ids.count(model.tokens["img_context"]) == 256
    two = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare."},
                {"type": "image_url", "image_url": {"url": images["square"]}},
                {"type": "image_url", "image_url": {"url": "file://" + images["tall"]}},
            ],
        }
    ]
    text, found = model.messages_prompt(two)
    assert "<|im_start|>user\nImage-1: <image>\nImage-2: <image>\nCompare.<|im_end|>" in text
    assert found == [images["square"], images["tall"]]


def test_results_and_streams_carry_ids_logprobs_finish_usage_and_timings(model):
    r = model.generate("Hello", max_new_tokens=5, ignore_eos=True, logprobs=3)
    assert len(r.token_ids) == 5 and r.finish_reason == "length"
    assert len(r.logprobs) == 5 and all(len(step) == 3 for step in r.logprobs)
    for step in r.logprobs:
        values = [lp for _, lp in step]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
    assert r.logprobs[0][0][0] == r.token_ids[0]  # greedy: the likeliest token is the one chosen
    assert r.stats.prompt_tokens == len(r.prompt_token_ids) and r.stats.generated_tokens == 5
    assert r.stats.ftl_s > 0 and r.stats.decode_tps > 0
    assert model.generate("Hello", max_new_tokens=2).logprobs is None
    chunks = list(model.stream("Hello", max_new_tokens=5, ignore_eos=True))
    assert "".join(c.text for c in chunks) == r.text
    assert [t for c in chunks for t in c.token_ids] == r.token_ids
    assert chunks[-1].finish_reason == "length" and chunks[-1].stats.generated_tokens == 5
    assert all(c.finish_reason is None and c.stats is None for c in chunks[:-1])


def test_stop_strings_end_the_answer_before_them(model):
    full = model.generate("Hello", max_new_tokens=12, ignore_eos=True).text
    stop = next(
        full[i : i + 2] for i in range(2, len(full) - 1) if full[i : i + 2].strip() and "\ufffd" not in full[i : i + 2]
    )
    r = model.generate("Hello", max_new_tokens=12, ignore_eos=True, stop=stop)
    assert r.text == full[: full.index(stop)] and r.finish_reason == "stop"


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def said(role: str, *parts) -> dict:
    return {"role": role, "content": list(parts)}


HI = {"role": "user", "content": "Hi"}


@pytest.mark.parametrize(
    "messages, needle",
    [
        ([said("user", image_part("https://example.com/a.png"))], "not fetched from http(s)"),
        ([HI, {"role": "assistant", "content": "Hello"}], "the last message must be the user's"),
        ([said("user", {"type": "audio", "audio": "x"})], "unsupported part type 'audio'"),
        ([{"role": "tool", "content": "x"}], "unsupported role 'tool'"),
        ([said("user", image_part("data:image/png;base64,%%%"))], "not valid base64"),
        ([said("user", image_part("data:text/plain;base64,aGk="))], "not an image"),
        ([said("user", image_part("data:image/png;base64,aGk="))], "not an image Pillow can read"),
        ([said("system", image_part("x.png")), HI], "only user messages may hold images"),
        ([], "non-empty list"),
    ],
)
def test_bad_messages_are_one_line_errors(model, messages, needle):
    with pytest.raises(UserError) as e:
        model.generate(messages=messages, max_new_tokens=2)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_prompt_and_messages_are_exclusive(model):
    with pytest.raises(UserError, match="not both"):
        model.generate("Hi", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(UserError, match="give a prompt or messages"):
        model.generate(max_new_tokens=2)


def test_decode_data_url():
    png = Image.new("RGB", (4, 4), (255, 0, 0))
    import io

    buf = io.BytesIO()
    png.save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    assert decode_data_url(url) == buf.getvalue()
    wrapped = url[:40] + "\n" + url[40:]  # line breaks inside base64 are tolerated
    assert decode_data_url(wrapped) == buf.getvalue()
    with pytest.raises(UserError, match="base64 data URLs"):
        decode_data_url("data:image/png,rawbytes")
    with pytest.raises(UserError, match="not int"):
        resolve_image(123)
    assert np.asarray(Image.open(io.BytesIO(decode_data_url(url)))).tolist() == np.asarray(png).tolist()
