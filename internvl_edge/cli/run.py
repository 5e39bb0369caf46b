"""`internvl-edge run`: one question, streamed to stdout (or one JSON object with --json)."""

from __future__ import annotations

import json
import sys

from .common import add_generation_arguments, add_model_arguments, generation_kwargs, load_model


def add_arguments(p) -> None:
    add_model_arguments(p)
    p.add_argument("-p", "--prompt", required=True, help="the question")
    p.add_argument("--image", action="append", default=[], help="image file (repeat for several images)")
    p.add_argument("--video", default=None, help="video file (8 evenly spaced frames, one tile each)")
    p.add_argument("--video-frames", dest="video_frames", type=int, default=8, help="frames sampled from --video")
    add_generation_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--logprobs", type=int, default=0, help="with --json: the K most likely tokens at every step")


def main(args) -> int:
    model = load_model(args, quiet=args.json)
    kw = generation_kwargs(args)
    if args.logprobs:
        kw["logprobs"] = args.logprobs
    request = {"images": args.image, "video": args.video, "video_frames": args.video_frames,
             "system": args.system, "max_tiles": args.max_tiles}  # fmt: skip
    if args.json:
        result = model.generate(args.prompt, **request, **kw)
        out = {
            "prompt_token_ids": result.prompt_token_ids,
            "token_ids": result.token_ids,
            "text": result.text,
            "logprobs": [[[t, lp] for t, lp in step] for step in result.logprobs] if result.logprobs else None,
            "finish_reason": result.finish_reason,
            "timings": {"ftl_s": result.stats.ftl_s, "decode_tps": result.stats.decode_tps,
                        "vision_s": result.stats.vision_s},
            "usage": {"prompt_tokens": result.stats.prompt_tokens, "completion_tokens": len(result.token_ids)},
            "backend": model.backend.describe(),
        }  # fmt: skip
        print(json.dumps(out, ensure_ascii=False))
        return 0
    stats = None
    for chunk in model.stream(args.prompt, **request, **kw):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        stats = chunk.stats or stats
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(f"FTL: {stats.ftl_s:.3f} s", file=sys.stderr)
    print(f"TPS: {stats.decode_tps:.3f} token/s", file=sys.stderr)
    return 0
