"""InternVL's chat template and image placeholders: question + media -> prompt text.

Templates are OpenGVLab's conversation templates (MPT separator style): the system turn, then
`roles[0] + message + sep` per user turn and `roles[1]` opening the answer.
https://github.com/OpenGVLab/InternVL/blob/main/internvl_chat/internvl/conversation.py
An image becomes `<img>` + `<IMG_CONTEXT>` x (256 x tiles) + `</img>` in place of `<image>`; several
images are introduced as `Image-1: <image>` ..., video frames as `Frame1: <image>` ... as in
InternVL's multi-image and video chat examples (https://huggingface.co/OpenGVLab/InternVL3-2B).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError
from .tokenizer import IMG_CONTEXT, IMG_END, IMG_START

IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class Template:
    name: str
    system_template: str
    system_message: str
    user: str
    assistant: str
    sep: str

    def system_turn(self, system: str | None = None) -> str:
        message = self.system_message if system is None else system
        return self.system_template.format(system_message=message) + self.sep

    def user_turn(self, question: str) -> str:
        """One user message and the opening of the answer."""
        return self.user + question + self.sep + self.assistant

    def conversation(self, question: str, system: str | None = None, history: list[tuple[str, str]] = ()) -> str:
        text = self.system_turn(system)
        for q, a in history:
            text += self.user + q + self.sep + self.assistant + a + self.sep
        return text + self.user_turn(question)


TEMPLATES = {
    # InternVL2.5 and InternVL3
    "internvl2_5": Template(
        name="internvl2_5",
        system_template="<|im_start|>system\n{system_message}",
        system_message="你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。",
        user="<|im_start|>user\n",
        assistant="<|im_start|>assistant\n",
        sep="<|im_end|>\n",
    ),
    # InternVL2 with Qwen2 (e.g. InternVL2-1B)
    "Hermes-2": Template(
        name="Hermes-2",
        system_template="<|im_start|>system\n{system_message}",
        system_message=(
            "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，"
            "英文名叫InternVL, 是一个有用无害的人工智能助手。"
        ),
        user="<|im_start|>user\n",
        assistant="<|im_start|>assistant\n",
        sep="<|im_end|>",
    ),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise UserError(f"chat template {name!r} is not supported (supported: {', '.join(TEMPLATES)})")
    return TEMPLATES[name]


def with_media_tags(question: str, n_images: int = 0, n_frames: int = 0) -> str:
    """Prefix the question with one `<image>` per image (or video frame), unless it places them itself."""
    if IMAGE_PLACEHOLDER in question:
        return question
    if n_frames:
        return "".join(f"Frame{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(n_frames)) + question
    if n_images == 1:
        return f"{IMAGE_PLACEHOLDER}\n{question}"
    if n_images > 1:
        return "".join(f"Image-{i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(n_images)) + question
    return question


def expand_images(text: str, tiles_per_image: list[int], tokens_per_tile: int) -> str:
    """Replace each `<image>` in order with its `<img><IMG_CONTEXT>...</img>` block."""
    if IMG_CONTEXT in text:
        raise UserError(f"the prompt contains the reserved token {IMG_CONTEXT}")
    count = text.count(IMAGE_PLACEHOLDER)
    if count != len(tiles_per_image):
        raise UserError(f"the prompt has {count} {IMAGE_PLACEHOLDER} placeholders for {len(tiles_per_image)} images")
    for tiles in tiles_per_image:
        block = IMG_START + IMG_CONTEXT * (tokens_per_tile * tiles) + IMG_END
        text = text.replace(IMAGE_PLACEHOLDER, block, 1)
    return text
