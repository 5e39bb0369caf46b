"""OpenAI chat messages -> the turns of an InternVL conversation (text, images, answers).

    [{"role": "system", "content": "You are ..."},
     {"role": "user", "content": [{"type": "text", "text": "Describe the image."},
                                  {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]},
     {"role": "assistant", "content": "A cat."},
     {"role": "user", "content": "And its colour?"}]

A user message may also hold a video, `{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,..."}}`
as vLLM takes it (Python callers: `{"type": "video", "video": path | bytes}`); its frames are chosen when
the prompt is built (api.Model), one tile each, as `run --video`. A message holds images or one video.

The format is OpenAI's chat completions `messages`
(https://platform.openai.com/docs/api-reference/chat/create). Every image reference goes through one
`resolve` function (every video one through `resolve_video`), so the caller decides what a URL may
name: the Python API reads data URLs and local paths, the server only data URLs and files under its
allowed folder (server/media.py). Nothing here fetches from the network.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from .errors import UserError

SYSTEM_ROLES = ("system", "developer")  # OpenAI's newer name for the system message


@dataclass
class Turn:
    """One user message (its text and images) and the assistant's answer to it (None: still open)."""

    question: str
    images: list = field(default_factory=list)
    answer: str | None = None
    video: object = None  # a video's bytes or path (its frames replace `images` when the prompt is built)
    video_at: str = ""  # where the video is in the messages, for errors found when it is decoded


@dataclass
class Conversation:
    system: str | None
    turns: list[Turn]

    @property
    def images(self) -> list:
        """Every image of the conversation, in prompt order."""
        return [img for turn in self.turns for img in turn.images]

    @property
    def videos(self) -> list:
        return [turn.video for turn in self.turns if turn.video is not None]


def decode_data_url(url: str, kind: str = "image") -> bytes:
    """`data:image/png;base64,....` -> the image bytes (RFC 2397, base64 form only); `kind` "video":
    `data:video/mp4;base64,...` (or application/octet-stream, as some browsers label a file)."""
    header, sep, data = url.partition(",")
    meta = header[len("data:") :]
    if not sep or not meta.endswith(";base64"):
        raise UserError(f"only base64 data URLs are supported (data:{kind}/...;base64,...)")
    mime = meta[: -len(";base64")].split(";")[0].strip().lower()
    if mime and not mime.startswith(f"{kind}/") and not (kind == "video" and mime == "application/octet-stream"):
        article = "an" if kind == "image" else "a"
        raise UserError(f"the data URL holds {mime!r}, not {article} {kind}")
    try:
        return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise UserError("the data URL is not valid base64") from None


def url_kind(url: str) -> str:
    """'data', 'file', 'remote' (http, https) or 'path' (a plain path); other schemes are refused."""
    scheme = urlsplit(url).scheme.lower() if ":" in url else ""
    if scheme == "data":
        return "data"
    if scheme == "file":
        return "file"
    if scheme in ("http", "https"):
        return "remote"
    if scheme and len(scheme) > 1:  # one letter: a Windows drive, i.e. a path
        raise UserError(f"image URLs with the scheme {scheme!r} are not supported (use a data URL)")
    return "path"


def file_url_path(url: str) -> str:
    """`file:///abs/path` (or `file://localhost/abs/path`) -> `/abs/path`, percent-decoded."""
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise UserError(f"file URLs must name a file on this machine, not on {parts.netloc!r}")
    return unquote(parts.path)


def resolve_image(ref):
    """The Python API's rule: PIL images and bytes as they are; data URLs decoded; `file://` URLs and
    paths read from disk; http(s) URLs refused (nothing is fetched from the network)."""
    if not isinstance(ref, (str, os.PathLike)):
        if isinstance(ref, (bytes, bytearray)) or hasattr(ref, "convert"):  # bytes, PIL images
            return ref
        raise UserError(f"an image must be a path, URL, bytes or PIL image, not {type(ref).__name__}")
    ref = os.fspath(ref)
    kind = url_kind(ref)
    if kind == "data":
        return decode_data_url(ref)
    if kind == "remote":
        raise UserError("images are not fetched from http(s) URLs; pass a data URL, a path or the bytes")
    return file_url_path(ref) if kind == "file" else ref


def resolve_video(ref):
    """The Python API's rule for videos: bytes as they are; data URLs decoded; `file://` URLs and paths
    as paths; http(s) URLs refused."""
    if isinstance(ref, (bytes, bytearray)):
        return bytes(ref)
    if not isinstance(ref, (str, os.PathLike)):
        raise UserError(f"a video must be a path, URL or bytes, not {type(ref).__name__}")
    ref = os.fspath(ref)
    kind = url_kind(ref)
    if kind == "data":
        return decode_data_url(ref, "video")
    if kind == "remote":
        raise UserError("videos are not fetched from http(s) URLs; pass a data URL, a path or the bytes")
    return file_url_path(ref) if kind == "file" else ref


def _video_ref(part: dict, where: str):
    if part.get("type") == "video":
        if part.get("video") is None:
            raise UserError(f"{where}: a video part needs a `video`")
        return part["video"]
    spec = part.get("video_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str) or not url.strip():
        example = '{"url": "data:video/mp4;base64,..."}'
        raise UserError(f"{where}: a video_url part needs a `url` (video_url: {example})")
    return url


def _image_ref(part: dict, where: str):
    if part.get("type") == "image":  # Python callers: {"type": "image", "image": path | bytes | PIL image}
        if part.get("image") is None:
            raise UserError(f"{where}: an image part needs an `image`")
        return part["image"]
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if url is None or (isinstance(url, str) and not url.strip()):
        raise UserError(f'{where}: an image_url part needs a `url` (image_url: {{"url": ...}})')
    return url


def _content(
    content, where: str, resolve: Callable, allow_images: bool, resolve_video: Callable = resolve_video
) -> tuple[str, list, object]:
    """A message's content (a string or a list of parts) -> its text, resolved images and video."""
    if content is None:
        return "", [], None
    if isinstance(content, str):
        return content, [], None
    if not isinstance(content, list):
        raise UserError(f"{where}.content must be a string or a list of parts")
    texts, images, video = [], [], None
    for i, part in enumerate(content):
        at = f"{where}.content[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise UserError(f"{at}: a text part needs a string `text`")
            texts.append(part["text"])
        elif kind in ("image_url", "image"):
            if not allow_images:
                raise UserError(f"{at}: only user messages may hold images")
            try:
                images.append(resolve(_image_ref(part, at)))
            except UserError as e:
                raise UserError(f"{at}: {e}") from None
        elif kind in ("video_url", "video"):
            if not allow_images:
                raise UserError(f"{at}: only user messages may hold videos")
            if video is not None:
                raise UserError(f"{at}: a message holds at most one video")
            try:
                video = resolve_video(_video_ref(part, at))
            except UserError as e:
                raise UserError(f"{at}: {e}") from None
        else:
            raise UserError(f"{at}: unsupported part type {kind!r} (supported: text, image_url, video_url)")
    if video is not None and images:
        raise UserError(f"{where}: a message holds either images or one video, not both")
    return "\n".join(texts), images, video


def parse_messages(
    messages: Sequence, resolve: Callable = resolve_image, resolve_video: Callable = resolve_video
) -> Conversation:
    """OpenAI messages -> Conversation. Consecutive messages of one role are joined; the last message
    must be the user's (the answer to it is what gets generated)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise UserError("messages must be a non-empty list of {role, content} objects")
    system: list[str] = []
    turns: list[Turn] = []
    last_role = None
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise UserError(f"{where} must be an object with `role` and `content`")
        role = msg.get("role")
        if role in SYSTEM_ROLES:
            text, _, _ = _content(msg.get("content"), where, resolve, allow_images=False)
            system.append(text)
            continue
        if role == "user":
            text, images, video = _content(msg.get("content"), where, resolve, True, resolve_video)
            if last_role == "user":  # two user messages in a row are one question
                turn = turns[-1]
                if (turn.video is not None and (images or video is not None)) or (turn.images and video is not None):
                    raise UserError(f"{where}: a question holds either images or one video, not both")
                turn.question = "\n".join(t for t in (turn.question, text) if t)
                turn.images += images
                if video is not None:
                    turn.video, turn.video_at = video, where
            else:
                turns.append(Turn(text, images, video=video, video_at=where))
        elif role == "assistant":
            if not turns:
                raise UserError(f"{where}: an assistant message must follow a user message")
            text, _, _ = _content(msg.get("content"), where, resolve, allow_images=False)
            turn = turns[-1]
            turn.answer = text if turn.answer is None else turn.answer + "\n" + text
        else:
            raise UserError(f"{where}: unsupported role {role!r} (supported: system, developer, user, assistant)")
        last_role = role
    if last_role != "user":
        raise UserError("the last message must be the user's (the reply to it is generated)")
    return Conversation("\n".join(system) if system else None, turns)
