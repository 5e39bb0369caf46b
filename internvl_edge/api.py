"""The public Python API, shared by the CLI and the server.

    import internvl_edge
    model = internvl_edge.load("internvl3_2b")
    out = model.generate("Describe the image.", images=["cat.jpg"], max_new_tokens=128)
    print(out.text, out.token_ids, out.finish_reason, out.stats.prompt_tokens, out.stats.ftl_s)
    for chunk in model.stream("Describe the image.", images=["cat.jpg"]):
        print(chunk.text, end="", flush=True)
    out = model.generate(messages=[{"role": "user", "content": [
        {"type": "text", "text": "Describe the image."},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}])
    chat = model.chat()
    chat.send("What is in the image?", images=["cat.jpg"]); chat.send("And its colour?")

Images may be paths, bytes or PIL images; a video is a path (in `messages`, also bytes or a data URL).
Generation options (`max_new_tokens`, `do_sample`, `temperature`, `top_k`, `top_p`,
`repetition_penalty`, `seed`, `stop`, `logprobs`, `ignore_eos`) are the keyword arguments of
`Model.generation_config`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np

from .backends import open_backend
from .backends.base import Backend
from .bundle import Manifest, load_manifest
from .checkpoint.generation_config import read_generation_config
from .errors import UserError
from .generate import Chunk, GenerationConfig, PreparedPrompt, Result, collect, stream
from .media import dynamic_preprocess, normalize, preprocess
from .messages import Conversation, parse_messages, resolve_image, resolve_video
from .prompt import Template, expand_images, get_template, with_media_tags
from .reuse import DEFAULT_IMAGE_CACHE_MB, DEFAULT_PREFIX_CACHE_MB, ImageCache, PrefixCache, image_key
from .sampling import NO_SAMPLING
from .tokenizer import TextTokenizer
from .video import DEFAULT_FRAMES, read_frames


@dataclass
class Media:
    """Tiles of the images (or video frames) of one request, and how they are introduced."""

    pixel_values: np.ndarray | None
    tiles_per_image: list[int]
    is_video: bool = False


class Model:
    """A loaded bundle: its backend, tokenizer and chat template."""

    def __init__(
        self,
        manifest: Manifest,
        backend: Backend | None,  # None: prompts, media and limits only (verify builds its probes so)
        tokenizer: TextTokenizer,
        config_dir: str,
        image_cache_mb: float = DEFAULT_IMAGE_CACHE_MB,
        prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB,
    ):
        self.manifest = manifest
        self.backend = backend
        self.tokenizer = tokenizer
        facts, opts = manifest.facts, manifest.settings
        self.template: Template = get_template(facts.template)
        self.tokens = facts.tokens
        self.tokens_per_tile = facts.num_image_token
        self.image_size = facts.image_size
        self.max_tiles = opts.max_tiles
        self.seq_length = opts.seq_length
        self.generation_defaults = read_generation_config(config_dir)
        # reuse within this process (reuse.py); a budget of 0 turns a cache off. Prefix reuse needs a
        # backend that can read and write a slot's KV rows (the KV of a Sophgo bmodel stays on the chip)
        self.image_cache = ImageCache(int(image_cache_mb * 2**20))
        self.prefix_cache = None
        if backend is not None and backend.can_copy_rows and prefix_cache_mb > 0:
            self.prefix_cache = PrefixCache(int(prefix_cache_mb * 2**20), backend.row_bytes)

    def clear_caches(self) -> None:
        """Forget every cached image embedding and prompt prefix (the next request runs cold)."""
        self.image_cache.clear()
        if self.prefix_cache is not None:
            self.prefix_cache.clear()

    # -- requests ----------------------------------------------------------------------------------
    def images_to_media(self, images: Sequence = (), max_tiles: int | None = None) -> Media:
        """Images (paths, bytes or PIL images) -> their tiles, `max_tiles` each (default: the bundle's)."""
        tiles = max_tiles or self.max_tiles
        if tiles < 1:
            raise UserError("max_tiles must be at least 1")
        if not images:
            return Media(None, [])
        # paths and URLs go through the API's rule (data and file URLs read, http(s) refused in those words)
        images = [resolve_image(img) if isinstance(img, (str, os.PathLike)) else img for img in images]
        prepared = [preprocess(img, max_tiles=tiles, tile=self.image_size) for img in images]
        return Media(np.concatenate([p.pixel_values for p in prepared]), [p.num_tiles for p in prepared])

    def video_to_media(self, path: str | bytes, frames: int = DEFAULT_FRAMES) -> Media:
        """`frames` evenly spaced frames, one 448x448 tile each (no thumbnail), as InternVL's video chat."""
        tiles = [dynamic_preprocess(f, max_tiles=1, tile=self.image_size)[0] for f in read_frames(path, frames)]
        return Media(normalize(tiles), [1] * len(tiles), is_video=True)

    def media_for(
        self,
        images: Sequence = (),
        video: str | None = None,
        max_tiles: int | None = None,
        video_frames: int | None = DEFAULT_FRAMES,
    ) -> Media:
        if video is not None and images:
            raise UserError("give either images or one video, not both")
        if video is not None:
            return self.video_to_media(resolve_video(video), video_frames or DEFAULT_FRAMES)
        return self.images_to_media(images, max_tiles)

    def video_prompt_tokens(self, prompt: str, frames: int, system: str | None = None) -> int:
        """Tokens of a one-turn video question with `frames` frames (frames' pixels play no part)."""
        media = Media(None, [1] * frames, is_video=True)
        return len(self.tokenize(self.question(prompt, media, system), media))

    def fit_video_frames(
        self, prompt: str, frames: int | None = None, system: str | None = None, room: int | None = None
    ) -> tuple[int, str]:
        """How many frames a video question gets, and one line saying why. `frames` None: as many as fit
        (up to DEFAULT_FRAMES) while ANSWER_ROOM tokens stay for the answer; a given count that leaves
        no room at all is refused with the largest count that fits. `room`: the context still free."""
        room = self.seq_length if room is None else room
        most = DEFAULT_FRAMES if frames is None else frames
        fits = [n for n in range(1, most + 1) if self.video_prompt_tokens(prompt, n, system) < room]
        largest = max(fits, default=0)
        if frames is not None:
            if frames < 1:
                raise UserError("the number of video frames must be at least 1")
            if largest < frames:
                tokens = self.video_prompt_tokens(prompt, frames, system)
                fix = f"use --video-frames {largest} or fewer" if largest else "shorten the question"
                raise UserError(
                    f"the prompt has {tokens} tokens with {frames} video frames but only {room - 1} fit in "
                    f"the bundle's seq_length {self.seq_length}: {fix}, or convert with a larger -s"
                )
            return frames, f"video: {frames} frames, as asked"
        keep = min(ANSWER_ROOM, room // 4)
        with_answer = [n for n in fits if self.video_prompt_tokens(prompt, n, system) <= room - keep]
        chosen = max(with_answer, default=1 if fits else 0)
        if not chosen:
            tokens = self.video_prompt_tokens(prompt, 1, system)
            raise UserError(
                f"the prompt has {tokens} tokens with one video frame but only {room - 1} fit in the "
                f"bundle's seq_length {self.seq_length}; shorten the question or convert with a larger -s"
            )
        if chosen == DEFAULT_FRAMES:
            return chosen, f"video: {chosen} evenly spaced frames (the default)"
        return chosen, (
            f"video: {chosen} evenly spaced frames, the most that fit the bundle's seq_length "
            f"{self.seq_length} with {keep} tokens left for the answer ({self.tokens_per_tile} "
            "tokens per frame; convert with a larger -s for more)"
        )

    def tokenize(self, text: str, media: Media | None = None) -> list[int]:
        """Prompt text with one `<image>` per image or frame -> token ids with the image blocks expanded."""
        media = media or Media(None, [])
        return self.tokenizer.encode(expand_images(text, media.tiles_per_image, self.tokens_per_tile))

    def prepare(
        self,
        text_or_ids: str | list[int],
        media: Media | None = None,
        room: int | None = None,
        started: float | None = None,
    ) -> PreparedPrompt:
        """Prompt (text with `<image>` placeholders, or its token ids) + media -> token ids and embeddings
        with the image embeddings in place. `room`: tokens the cache can still take (default: the
        bundle's seq_length); a prompt that leaves no room for an answer is refused before any image
        is encoded."""
        started = time.perf_counter() if started is None else started
        media = media or Media(None, [])
        ids = self.tokenize(text_or_ids, media) if isinstance(text_or_ids, str) else list(text_or_ids)
        self.check_fits(len(ids), media, self.seq_length if room is None else room)
        embeds = self.backend.embed(np.asarray([ids], np.int64))[0]
        key = np.asarray(ids, np.int64)
        vision_s = 0.0
        if media.pixel_values is not None:
            per_image, keys, vision_s = self.encode_media(media)
            rows = np.flatnonzero(key == self.tokens["img_context"])
            flat = np.concatenate([e.reshape(-1, e.shape[-1]) for e in per_image])
            if len(rows) != len(flat):
                raise UserError(f"the prompt has {len(rows)} image positions for {len(flat)} image embeddings")
            embeds = np.array(embeds, copy=True)
            embeds[rows] = flat
            key[rows] = np.repeat(keys, [len(e.reshape(-1, e.shape[-1])) for e in per_image])
        return PreparedPrompt(ids, embeds, vision_s, int(sum(media.tiles_per_image)), started, key=key)

    def encode_media(self, media: Media) -> tuple[list[np.ndarray], list[int], float]:
        """Each image's (or frame's) embeddings, from the image cache when its tiles were seen before, else
        from the vision encoder, one image per call (so an image's embeddings never depend on what else
        the request holds). Returns them, the images' content keys and the vision encoder's seconds."""
        per_image, keys, seconds, start = [], [], 0.0, 0
        for n in media.tiles_per_image:
            pixels = media.pixel_values[start : start + n]
            start += n
            key = image_key(pixels)
            embeds = self.image_cache.get(key)
            if embeds is None:
                t0 = time.perf_counter()
                embeds = self.backend.encode_images(pixels)
                seconds += time.perf_counter() - t0
                self.image_cache.put(key, embeds)
            per_image.append(embeds)
            keys.append(key)
        return per_image, keys, seconds

    def check_fits(self, n_tokens: int, media: Media, room: int) -> None:
        """Refuse (UserError, saying what to change) a prompt that leaves no room for an answer."""
        if n_tokens < room:
            return
        media_tokens = self.tokens_per_tile * sum(media.tiles_per_image)
        head = f"the prompt has {n_tokens} tokens but only {room - 1} fit in the bundle's seq_length {self.seq_length}"
        if media.is_video:
            per_frame = self.tokens_per_tile + 8  # a frame's tile plus its `FrameN: <img></img>` text
            fit = max(0, (room - 1 - (n_tokens - media_tokens)) // per_frame)
            raise UserError(
                f"{head}: {len(media.tiles_per_image)} video frames take {media_tokens}; "
                f"use --video-frames {fit} or fewer, or convert with a larger -s"
            )
        if media_tokens:
            raise UserError(
                f"{head} ({sum(media.tiles_per_image)} image tiles take {media_tokens}); "
                "use fewer tiles (--max-tiles) or images, or convert with a larger -s"
            )
        raise UserError(f"{head}; shorten it or convert with a larger -s")

    def question(self, question: str, media: Media, system: str | None = None, first_turn: bool = True) -> str:
        """The chat-template text for one user turn (with the system turn when it opens a conversation)."""
        q = with_media_tags(
            question,
            n_images=0 if media.is_video else len(media.tiles_per_image),
            n_frames=len(media.tiles_per_image) if media.is_video else 0,
        )
        if first_turn:
            return self.template.conversation(q, system)
        return self.template.sep + self.template.user_turn(q)  # closes the previous answer first

    def generation_config(self, **overrides) -> GenerationConfig:
        """Defaults from the bundle's generation_config.json (transformers' where it is silent)."""
        sampling = self.generation_defaults.sampling
        for key in ("temperature", "top_k", "top_p", "repetition_penalty"):
            if overrides.get(key) is not None:
                sampling = replace(sampling, **{key: type(getattr(sampling, key))(overrides.pop(key))})
            else:
                overrides.pop(key, None)
        sampling.validate()
        extra_stops = overrides.pop("stop", None) or ()
        extra_stops = (extra_stops,) if isinstance(extra_stops, str) else tuple(extra_stops)
        max_new = overrides.pop("max_new_tokens", None)
        cfg = GenerationConfig(
            max_new_tokens=self.seq_length if max_new is None else int(max_new),
            do_sample=bool(overrides.pop("do_sample", False)),
            sampling=sampling,
            seed=overrides.pop("seed", None),
            stop_token_ids=tuple(int(t) for t in self.tokens["eos"]),
            stop_strings=self.generation_defaults.stop_strings + extra_stops,
            logprobs=int(overrides.pop("logprobs", 0) or 0),
            ignore_eos=bool(overrides.pop("ignore_eos", False)),
        )
        if overrides:
            raise TypeError(f"unknown generation options: {', '.join(overrides)}")
        if cfg.max_new_tokens < 1:
            raise UserError("max_new_tokens must be at least 1")
        if cfg.do_sample and not self.backend.can_sample:
            raise UserError(NO_SAMPLING)
        if cfg.seed is not None and (isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0):
            raise UserError(f"seed must be a non-negative integer, got {cfg.seed!r}")
        return cfg

    def conversation_text(self, conversation: Conversation, frames: int = 0) -> str:
        """The chat-template text of a conversation: every turn's images (or its video's `frames`)
        introduced by `<image>` placeholders (as `question` does for one turn), earlier answers closed
        by the separator."""
        tagged = [
            with_media_tags(t.question, n_images=len(t.images), n_frames=frames if t.video is not None else 0)
            for t in conversation.turns
        ]
        history = [(q, t.answer or "") for q, t in zip(tagged[:-1], conversation.turns[:-1], strict=True)]
        return self.template.conversation(tagged[-1], conversation.system, history)

    def messages_prompt(self, messages: Sequence[dict], resolve=resolve_image) -> tuple[str, list]:
        """OpenAI-format messages -> (chat-template text with `<image>` placeholders, images in order).
        `resolve` turns each image reference (URL, path, bytes, PIL image) into something
        `images_to_media` reads; the default reads data URLs and local paths and refuses http(s)."""
        conversation = parse_messages(messages, resolve)
        return self.conversation_text(conversation), conversation.images

    def conversation_media(
        self, conversation: Conversation, max_tiles: int | None = None, video_frames: int = DEFAULT_FRAMES
    ) -> tuple[str, Media]:
        """A parsed conversation -> its prompt text and media in prompt order. Each video gets the same
        number of frames (one tile each, as `run --video`): `video_frames`, or fewer when the context
        would not keep ANSWER_ROOM tokens for the answer with them (at least one frame)."""
        if not conversation.videos:
            return self.conversation_text(conversation), self.images_to_media(conversation.images, max_tiles)
        if video_frames < 1:
            raise UserError("the number of video frames must be at least 1")
        images = self.images_to_media(conversation.images, max_tiles)
        image_tiles = iter(images.tiles_per_image)
        per_turn = [[next(image_tiles) for _ in t.images] for t in conversation.turns]

        def layout(frames: int) -> list[int]:  # tiles per `<image>`, in prompt order
            turns = zip(conversation.turns, per_turn, strict=True)
            return [n for t, tiles in turns for n in (tiles if t.video is None else [1] * frames)]

        def prompt_tokens(frames: int) -> int:
            return len(self.tokenize(self.conversation_text(conversation, frames), Media(None, layout(frames))))

        room = self.seq_length - min(ANSWER_ROOM, self.seq_length // 4)
        frames = video_frames
        while frames > 1 and prompt_tokens(frames) > room:
            frames -= 1
        ends = np.cumsum(images.tiles_per_image, dtype=np.int64)
        image_pixels = iter(np.split(images.pixel_values, ends[:-1]) if len(ends) else [])
        pixels = []
        for t in conversation.turns:
            if t.video is None:
                pixels += [next(image_pixels) for _ in t.images]
            else:
                try:
                    pixels.append(self.video_to_media(t.video, frames).pixel_values)
                except UserError as e:
                    raise UserError(f"{t.video_at}: {e}") from None
        text = self.conversation_text(conversation, frames)
        return text, Media(np.concatenate(pixels), layout(frames), is_video=True)

    def request(
        self,
        prompt: str | None = None,
        images: Sequence = (),
        system: str | None = None,
        max_tiles: int | None = None,
        video: str | None = None,
        video_frames: int | None = None,
        messages: Sequence[dict] | None = None,
        resolve=resolve_image,
        resolve_video=resolve_video,
    ) -> tuple[list[int], Media]:
        """One independent request (a question with its media, or OpenAI messages whose image and video
        references go through `resolve` and `resolve_video`) -> prompt token ids and media, checked to
        fit the bundle; nothing runs on the model yet."""
        if messages is not None:
            if prompt is not None or images or video is not None or system is not None:
                raise UserError("give either messages or a prompt (with images, video, system), not both")
            conversation = parse_messages(messages, resolve, resolve_video)
            text, media = self.conversation_media(conversation, max_tiles, video_frames or DEFAULT_FRAMES)
        else:
            if prompt is None:
                raise UserError("give a prompt or messages")
            if video is not None:
                video_frames, _ = self.fit_video_frames(prompt, video_frames, system)
            media = self.media_for(images, video, max_tiles, video_frames)
            text = self.question(prompt, media, system)
        ids = self.tokenize(text, media)
        self.check_fits(len(ids), media, self.seq_length)
        return ids, media

    def stream(
        self,
        prompt: str | None = None,
        images: Sequence = (),
        system: str | None = None,
        max_tiles: int | None = None,
        video: str | None = None,
        video_frames: int | None = None,
        messages: Sequence[dict] | None = None,
        **gen,
    ) -> Iterator[Chunk]:
        """Stream the answer to one independent question (system prompt + question, or `messages`; `gen`:
        generation options, see `generation_config`). Chunks carry `text` and `token_ids`; the last one
        `finish_reason` ("stop"/"length"), `stats` and `prompt_token_ids`."""
        started = time.perf_counter()
        cfg = self.generation_config(**gen)
        ids, media = self.request(prompt, images, system, max_tiles, video, video_frames, messages)
        prepared = self.prepare(ids, media, started=started)
        cache = self.backend.new_cache(1)
        yield from stream(self.backend, self.tokenizer, cache, prepared, cfg, self.prefix_cache)

    def generate(self, *args, **kwargs) -> Result:
        """`stream`'s answer (same arguments), collected. The Result has `text`, `token_ids`,
        `prompt_token_ids`, `logprobs` (with `logprobs=K`), `finish_reason` ("stop"/"length"), `notice`
        (why the context cut the answer short, or None) and `stats`: usage (`prompt_tokens`,
        `generated_tokens`) and timings (`ftl_s`, `decode_tps`, `vision_s`)."""
        return collect(self.stream(*args, **kwargs))

    def chat(self, system: str | None = None) -> ChatSession:
        return ChatSession(self, system)


ANSWER_ROOM = 128


class ChatSession:
    """A conversation. Bundles converted with --use_block_with_kv keep earlier turns as KV cache (the
    next turn prefills only its own tokens); other bundles answer every turn on its own, as the seed."""

    def __init__(self, model: Model, system: str | None = None):
        self.model = model
        self.system = system
        self.keeps_history = model.manifest.settings.use_block_with_kv
        self.cache = model.backend.new_cache(1)
        self.turns = 0

    def clear(self) -> None:
        self.cache.reset()
        self.turns = 0

    def stream(
        self,
        text: str,
        images: Sequence = (),
        max_tiles: int | None = None,
        video: str | None = None,
        video_frames: int = DEFAULT_FRAMES,
        media: Media | None = None,
        on_notice=None,
        **gen,
    ) -> Iterator[Chunk]:
        """One turn. A turn longer than --max_input_length is refused (with history); when history and
        turn together would not fit, `on_notice` is told and the history is cleared first (the seed's
        behaviour)."""
        started = time.perf_counter()
        model = self.model
        cfg = model.generation_config(**gen)
        media = media or model.media_for(images, video, max_tiles, video_frames)
        if not self.keeps_history:
            self.clear()
        ids = model.tokenize(model.question(text, media, self.system, first_turn=self.turns == 0), media)
        if self.keeps_history and len(ids) > model.backend.max_input_length:
            raise UserError(
                f"this turn has {len(ids)} tokens; the bundle's --max_input_length is "
                f"{model.backend.max_input_length} (ask a shorter question, use fewer tiles, or convert again)"
            )
        if self.turns and not self._fits(len(ids)):
            if on_notice:
                on_notice("the history is full; it was cleared to continue")
            self.clear()
            ids = model.tokenize(model.question(text, media, self.system, first_turn=True), media)
        prepared = model.prepare(ids, media, room=self._room(), started=started)
        self.turns += 1
        last, finish = None, None
        for chunk in stream(model.backend, model.tokenizer, self.cache, prepared, cfg, model.prefix_cache):
            last = chunk.token_ids[-1] if chunk.token_ids else last
            finish = chunk.finish_reason or finish
            yield chunk
        if self.keeps_history and finish == "length" and last is not None and self._room() > 0:
            # a stop token is never fed (the next turn opens with the separator that closes the answer),
            # but an answer cut by max_new_tokens still needs its last token in the history
            model.backend.forward(self.cache, model.backend.embed(np.array([[last]], np.int64)), [1])

    def _room(self) -> int:
        return self.model.seq_length - int(self.cache.lengths[0])

    def _fits(self, turn_tokens: int) -> bool:
        """History + this turn + room for an answer within what a prefill may see (the seed keeps 128
        tokens for the answer: pipeline.py, `SEQLEN - 128`)."""
        opts = self.model.manifest.settings
        limit = min(opts.max_prefill_kv_length, opts.seq_length - ANSWER_ROOM)
        return int(self.cache.lengths[0]) + turn_tokens <= limit

    def send(self, text: str, images: Sequence = (), **kw) -> Result:
        """One turn, collected: text, token ids, finish reason and timings."""
        return collect(self.stream(text, images, **kw), [])


def load(
    bundle: str,
    threads: int | None = None,
    device=None,
    config_path: str | None = None,
    verify: bool = True,
    log=None,
    edits=None,
    image_cache_mb: float = DEFAULT_IMAGE_CACHE_MB,
    prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB,
) -> Model:
    """Open a bundle folder written by `internvl-edge convert`. `edits` ({net: function(ModelProto)})
    change nets in memory before they load (`internvl-edge verify` uses it). `image_cache_mb` and
    `prefix_cache_mb` bound what the model keeps for reuse (reuse.py; 0 turns that cache off)."""
    manifest = load_manifest(bundle, verify=verify)
    config_dir = config_path or manifest.config_dir
    if not os.path.isdir(config_dir):
        raise UserError(f"config folder not found: {config_dir}")
    tokenizer = TextTokenizer(config_dir)
    backend = open_backend(manifest, threads=threads, devid=device, log=log, edits=edits)
    return Model(manifest, backend, tokenizer, config_dir, image_cache_mb, prefix_cache_mb)
