"""Video: InternVL's frame choice, the containers and codecs users have, odd and broken files, and the
answer against the reference given the same frames."""

from __future__ import annotations

import fractions

import av
import numpy as np
import pytest
from PIL import Image
from reference import greedy, load_reference, reference_tokenizer
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from internvl_edge.api import load
from internvl_edge.errors import UserError
from internvl_edge.video import frame_indices, read_frames

LEVEL = 8  # frame i is a flat grey of level 8 * i, so a decoded frame tells its index


def write_video(path, codec: str, n: int, size=(64, 48), vfr: bool = False, fmt: str | None = None) -> str:
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=25)
        stream.width, stream.height = size
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if codec in ("libx264", "h264"):
            stream.options = {"crf": "1", "preset": "ultrafast"}
        elif codec == "libvpx-vp9":
            stream.options = {"crf": "4", "b": "0"}
        elif codec == "mjpeg":
            stream.options = {"q": "1"}
        stream.codec_context.time_base = fractions.Fraction(1, 1000)
        t = 0
        for i in range(n):
            img = np.full((size[1], size[0], 3), (LEVEL * i) % 256, np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = t
            frame.time_base = fractions.Fraction(1, 1000)
            t += (15 if i % 3 else 80) if vfr else 40  # variable frame rate: uneven gaps
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return str(path)


def decoded_index(frame: Image.Image) -> int:
    return int(round(np.asarray(frame, np.float32).mean() / LEVEL))


def test_frame_indices_match_internvl_get_index():
    # InternVL's get_index(bound=None, max_frame=total-1, num_segments): int(seg/2 + round(seg*i))
    def get_index(total, n):
        seg = float(total - 1) / n
        return [int(seg / 2 + np.round(seg * i)) for i in range(n)]

    for total in (1, 2, 3, 7, 8, 9, 30, 31, 250, 1000):
        for n in (1, 4, 8, 16):
            assert frame_indices(total, n) == get_index(total, n)
    assert frame_indices(3, 8) == [0, 0, 0, 1, 1, 1, 2, 2]  # shorter than the frame count: repeats


@pytest.mark.parametrize(
    "name, codec, fmt",
    [
        ("clip.mp4", "libx264", None),
        ("clip.webm", "libvpx-vp9", None),
        ("clip.avi", "mjpeg", None),
        ("clip.mkv", "libx264", None),
    ],
)
def test_containers_and_codecs(tmp_path, name, codec, fmt):
    path = write_video(tmp_path / name, codec, 30)
    frames = read_frames(path, 8)
    assert len(frames) == 8 and all(f.mode == "RGB" and f.size == (64, 48) for f in frames)
    assert [decoded_index(f) for f in frames] == frame_indices(30, 8)


def test_variable_frame_rate_and_short_videos(tmp_path):
    vfr = write_video(tmp_path / "vfr.mp4", "libx264", 25, vfr=True)
    assert [decoded_index(f) for f in read_frames(vfr, 8)] == frame_indices(25, 8)
    short = write_video(tmp_path / "short.mp4", "libx264", 3)
    assert [decoded_index(f) for f in read_frames(short, 8)] == [0, 0, 0, 1, 1, 1, 2, 2]
    one = write_video(tmp_path / "one.webm", "libvpx-vp9", 1)
    assert [decoded_index(f) for f in read_frames(one, 4)] == [0, 0, 0, 0]


def test_broken_videos_are_clear_errors(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    with pytest.raises(UserError, match="junk.mp4"):
        read_frames(str(junk))
    empty = tmp_path / "empty.mp4"
    with av.open(str(empty), "w") as out:
        s = out.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        out.start_encoding()  # a header and a video stream, but not one frame
    with pytest.raises(UserError, match="no video frames|no video stream|cannot|not a video"):
        read_frames(str(empty))
    good = write_video(tmp_path / "good.mp4", "libx264", 30)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(open(good, "rb").read()[:600])
    with pytest.raises(UserError):
        read_frames(str(cut))
    audio = tmp_path / "audio.wav"
    with av.open(str(audio), "w") as out:
        a = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.rate = 8000
        for p in a.encode(frame):
            out.mux(p)
    with pytest.raises(UserError, match="no video stream"):
        read_frames(str(audio))
    with pytest.raises(UserError, match="not found"):
        read_frames(str(tmp_path / "missing.mp4"))


@pytest.mark.parametrize("name", ["tiny_bf16", "odd35_bf16"])
def test_video_answer_matches_reference(name, checkpoint, bundle, tmp_path):
    """The f32 bundle's greedy tokens for a video question equal the reference's on the same frames
    (decoded here independently, one 448 tile each via transformers' processor); InternVL3 and 3.5."""
    path = write_video(tmp_path / "v.mp4", "libx264", 40, size=(320, 240))
    ckpt = checkpoint(name)
    container = av.open(path)
    all_frames = [f.to_image() for f in container.decode(video=0)]
    container.close()
    frames = [all_frames[i] for i in frame_indices(len(all_frames), 4)]
    proc = GotOcr2ImageProcessorPil(
        crop_to_patches=False,
        size={"height": 448, "width": 448},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    pv = proc(images=frames, return_tensors="np")["pixel_values"]
    system = (
        "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
    )
    question = "".join(f"Frame{i + 1}: <image>\n" for i in range(4)) + "What happens?"
    text = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    text = text.replace("<image>", "<img>" + "<IMG_CONTEXT>" * 256 + "</img>")
    ids = reference_tokenizer(ckpt)(text).input_ids
    ref_tokens, _ = greedy(load_reference(ckpt), ids, pv, 16)
    ours = load(bundle(name, "f32")).generate(
        "What happens?", video=path, video_frames=4, max_new_tokens=16, ignore_eos=True
    )
    assert ours.prompt_token_ids == ids
    assert ours.token_ids == ref_tokens
    assert ours.stats.num_tiles == 4


def test_too_many_frames_for_the_bundle(bundle, tmp_path):
    path = write_video(tmp_path / "v.mp4", "libx264", 20)
    model = load(bundle("tiny_bf16", "w4bf16", seq_length=512))
    with pytest.raises(UserError, match="--video-frames 1 or fewer"):
        model.generate("What happens?", video=path, video_frames=8, max_new_tokens=2)  # 8 x 256 tokens > 512
    assert model.generate("What happens?", video=path, video_frames=1, max_new_tokens=2).token_ids
    # without a count, as many frames as fit with room for an answer: one here
    assert model.fit_video_frames("What happens?")[0] == 1
    assert model.generate("What happens?", video=path, max_new_tokens=2).stats.num_tiles == 1
    with pytest.raises(UserError, match="either images or one video"):
        model.generate("x", images=[path], video=path)
