"""Video in, evenly spaced RGB frames out (PyAV), as InternVL's video chat samples them.

Frame choice is InternVL's `get_index` without a time bound: the video's frame range [0, last] is cut
into `num_segments` equal segments and the middle frame of each is taken, so a video shorter than the
frame count repeats frames instead of failing.
https://huggingface.co/OpenGVLab/InternVL3-2B (README, "video multi-round conversation": get_index,
load_video with num_segments=8, each frame one 448x448 tile, prompt `Frame1: <image>\\n...`)
Frames are counted by decoding when the container does not record a count (webm, some mkv), and
decoding stops at the last wanted frame. A video is a path or its bytes (a request's data URL); errors
name the path, or "the video file" for bytes.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from .errors import UserError

DEFAULT_FRAMES = 8  # the seed's num_segments


def frame_indices(total_frames: int, num_segments: int) -> list[int]:
    """Middle frame of each of `num_segments` equal segments of [0, total_frames - 1]."""
    if total_frames < 1:
        raise ValueError("a video needs at least one frame")
    segment = (total_frames - 1) / num_segments
    # np.round rounds halves to even, as InternVL's get_index does
    return [min(int(segment / 2 + np.round(segment * i)), total_frames - 1) for i in range(num_segments)]


def _name(source) -> str:
    return "the video file" if isinstance(source, (bytes, bytearray)) else source


def _open(source):
    import av

    try:
        container = av.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
    except PermissionError:
        raise UserError(f"cannot read {_name(source)}: permission denied") from None
    except (av.error.FFmpegError, OSError, ValueError):
        raise UserError(f"{_name(source)} is not a video file (or is damaged): {NOT_A_VIDEO}") from None
    if not container.streams.video:
        container.close()
        raise UserError(f"{_name(source)} has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return container, stream


NOT_A_VIDEO = "give a video such as .mp4, .webm, .mkv or .avi"


def probe(path: str | bytes) -> None:
    """Refuse (UserError) what PyAV cannot open as a video, without decoding more than its header."""
    if not isinstance(path, (bytes, bytearray)) and not os.path.exists(path):
        raise UserError(f"video not found: {path}")
    container, _ = _open(path)
    container.close()


def _count_frames(path) -> int:
    import av

    container, stream = _open(path)
    try:
        return sum(1 for _ in container.decode(stream))
    except av.error.FFmpegError:
        raise UserError(f"{_name(path)} cannot be decoded as a video: {NOT_A_VIDEO}") from None
    finally:
        container.close()


def read_frames(path: str | bytes, num_segments: int = DEFAULT_FRAMES) -> list[Image.Image]:
    """`num_segments` RGB frames of the video at `path` (or in these bytes)."""
    import av

    if num_segments < 1:
        raise UserError("the number of video frames must be at least 1")
    if isinstance(path, (bytes, bytearray)):
        if not path:
            raise UserError("the video is empty")
    elif not os.path.exists(path):
        raise UserError(f"video not found: {path}")
    container, stream = _open(path)
    total = int(stream.frames or 0)
    container.close()
    if total <= 0:
        total = _count_frames(path)
    if total <= 0:
        raise UserError(f"{_name(path)} has no video frames")
    for attempt in range(2):
        wanted = frame_indices(total, num_segments)
        needed = set(wanted)
        found: dict[int, Image.Image] = {}
        container, stream = _open(path)
        decoded = 0
        try:
            for index, frame in enumerate(container.decode(stream)):
                decoded = index + 1
                if index in needed:
                    found[index] = frame.to_image().convert("RGB")
                if index >= wanted[-1]:
                    break
        except av.error.FFmpegError:
            if not found:
                raise UserError(f"{_name(path)} cannot be decoded as a video: {NOT_A_VIDEO}") from None
        finally:
            container.close()
        if len(found) == len(needed):
            return [found[i] for i in wanted]
        if attempt == 0 and decoded and decoded < total:  # the recorded count was too high: recount
            total = _count_frames(path)
            if total <= 0:
                break
            continue
        break
    raise UserError(f"{_name(path)} is damaged: frames {sorted(needed - set(found))[:3]} could not be decoded")
