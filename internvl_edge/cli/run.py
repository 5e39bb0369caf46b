"""`internvl-edge run`: one question, streamed to stdout (or one JSON object with --json).

Input files (images, video, prompt file) are checked before the bundle loads; notes about the answer
(frames chosen for a video, an answer the context cut, one that decodes to no visible text) go to
stderr on one line each.
"""

from __future__ import annotations

import json
import sys

from ..errors import UserError
from .common import (
    add_generation_arguments,
    add_model_arguments,
    check_image_file,
    check_video_file,
    generation_kwargs,
    int_at_least,
    load_model,
    read_text_file,
)


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("-p", "--prompt", default=None, help="the question (default: none; give -p or --prompt-file)")
    p.add_argument(
        "--prompt-file",
        dest="prompt_file",
        default=None,
        help="read the question from this UTF-8 text file (default: none; use -p)",
    )
    p.add_argument("--image", action="append", default=[], help="image file; repeat for several images (default: none)")
    p.add_argument("--video", default=None, help="video file, frames evenly spaced, one tile each (default: none)")
    p.add_argument(
        "--video-frames",
        dest="video_frames",
        type=int_at_least(1),
        default=None,
        help="frames sampled from --video (default: as many as fit the bundle's context, up to 8)",
    )
    add_generation_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument(
        "--logprobs",
        type=int_at_least(0),
        default=0,
        help="with --json: the K most likely tokens at every step (default 0: none)",
    )


def note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


def check_inputs(args) -> tuple[str, list[str], str | None]:
    """The question, image paths and video path, every file checked before the bundle loads."""
    if (args.prompt is None) == (args.prompt_file is None):
        raise UserError("give the question with -p TEXT or --prompt-file FILE (one of them)")
    prompt = args.prompt if args.prompt is not None else read_text_file(args.prompt_file, "--prompt-file")
    if not prompt.strip():
        raise UserError(f"the question is empty{f' ({args.prompt_file})' if args.prompt_file else ''}")
    if args.video and args.image:
        raise UserError("give either --image or --video, not both")
    if args.video_frames is not None and not args.video:
        raise UserError("--video-frames needs --video")
    if args.logprobs and not args.json:
        raise UserError("--logprobs needs --json (the log-probabilities are part of the JSON object)")
    images = [check_image_file(path) for path in args.image]
    video = check_video_file(args.video) if args.video else None
    return prompt, images, video


def blank_answer_note(model, token_ids: list[int]) -> str:
    """Why an answer with tokens shows no text: ids beyond the tokenizer decode to nothing."""
    known = model.tokenizer.vocab_size()
    vocab = model.manifest.facts.vocab_size or known
    beyond = sum(1 for t in token_ids if t >= known)
    why = ""
    if beyond:
        why = (
            f"; {beyond} of them are ids the tokenizer does not have (it covers {known} of the model's {vocab}"
            " ids; a random checkpoint made by an older make-checkpoint: make it again)"
        )
    return f"the answer's {len(token_ids)} tokens decode to no visible text{why}"


def main(args) -> int:
    prompt, images, video = check_inputs(args)
    model = load_model(args, quiet=args.json)
    kw = generation_kwargs(args)
    if args.logprobs:
        kw["logprobs"] = args.logprobs
    frames = None
    if video:
        frames, why = model.fit_video_frames(prompt, args.video_frames, args.system)
        if not args.json:
            note(why)
    request = {
        "images": images,
        "video": video,
        "video_frames": frames,
        "system": args.system,
        "max_tiles": args.max_tiles,
    }
    if args.json:
        result = model.generate(prompt, **request, **kw)
        out = {
            "prompt_token_ids": result.prompt_token_ids,
            "token_ids": result.token_ids,
            "text": result.text,
            "logprobs": [[[t, lp] for t, lp in step] for step in result.logprobs] if result.logprobs else None,
            "finish_reason": result.finish_reason,
            "timings": {
                "ftl_s": result.stats.ftl_s,
                "decode_tps": result.stats.decode_tps,
                "vision_s": result.stats.vision_s,
            },
            "usage": {"prompt_tokens": result.stats.prompt_tokens, "completion_tokens": len(result.token_ids)},
            "backend": model.backend.describe(),
            "bundle": {
                "path": model.manifest.path,
                "quantize": model.manifest.settings.quantize,
                "verification": model.manifest.verification or None,
            },  # convert --verify's summary
        }
        if video:
            out["video_frames"] = frames
        if result.notice:
            out["notice"] = result.notice
        print(json.dumps(out, ensure_ascii=False))
        if result.notice:
            note(result.notice)
        return 0
    stats, notice, text, ids = None, None, [], []
    for chunk in model.stream(prompt, **request, **kw):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        text.append(chunk.text)
        ids += chunk.token_ids
        stats = chunk.stats or stats
        notice = chunk.notice or notice
    sys.stdout.write("\n")
    sys.stdout.flush()
    if notice:
        note(notice)
    if ids and not "".join(text).strip():
        note(blank_answer_note(model, ids))
    print(f"FTL: {stats.ftl_s:.3f} s", file=sys.stderr)
    print(f"TPS: {stats.decode_tps:.3f} token/s", file=sys.stderr)
    return 0
