"""
`qwen-vl serve MODEL`: the OpenAI Chat Completions API for a saved Qwen-VL repo, on FastAPI + uvicorn.

`POST /v1/chat/completions` takes messages whose content is a string or a list of `{"type": "text", "text": ...}`
and `{"type": "image_url", "image_url": {"url": ...}}` items (`data:` URLs always; local paths and `file://` URLs
under `--image-root`; http(s) URLs with `--allow-remote-images`, within the processor's timeout and size limits).
The conversation is written with the processor's ChatML chat template, so the model sees exactly what
`processor.apply_chat_template` gives. `GET /v1/models` lists the one served model. `temperature: 0` decodes
greedily; unset `temperature`/`top_p` take the repo's generation config (the official chat config samples with
`top_p` 0.5). `seed` seeds torch's generator before a sampled batch (only requests with equal settings share one).
`usage.completion_tokens` counts the generated tokens, the reply's end token included.

Requests that arrive together are generated as one left-padded `generate` batch (up to `--max-batch-size` rows) by a
single worker thread; requests with different sampling settings wait for the next batch. Grounding answers keep the
model's `<ref>...</ref><box>...</box>` text; when an answer holds boxes, its message also carries `grounding`: the
boxes in pixels of each input image. Bad requests get a 4xx with an OpenAI-style error body and the server keeps
serving the others.
"""

import argparse
import asyncio
import base64
import binascii
import contextlib
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import PIL.Image
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from transformers import StoppingCriteria, StoppingCriteriaList

from modeling_qwen_vl import parse_grounding
from modeling_qwen_vl.image_processing_qwen_vl import REMOTE_IMAGE_MAX_BYTES, load_image
from modeling_qwen_vl.text_format import IMAGE_TAG

from .loading import load_model, model_parser, reply_end_ids


class APIError(Exception):
    """A request the server refuses: becomes `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code

    def response(self) -> JSONResponse:
        error_type = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"error": {"message": self.message, "type": error_type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None
    model_config = ConfigDict(extra="allow")


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The Chat Completions fields this server reads; other OpenAI fields are accepted and ignored."""

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    model_config = ConfigDict(extra="allow")


@dataclass
class ServerConfig:
    """How the server treats requests (the `qwen-vl serve` options)."""

    model_name: str
    max_batch_size: int = 8
    batch_wait: float = 0.01  # seconds the worker waits for more requests after the first one of a batch
    image_root: str | None = None
    allow_remote_images: bool = False


# ---------------------------------------------------------------------------------------------------------------
# Request → model input


def _open_image(url: str, param: str, config: ServerConfig) -> PIL.Image.Image:
    """The RGB image an `image_url` names; anything that cannot be used raises an `APIError` naming `param`."""
    try:
        if url.startswith("data:"):
            header, _, payload = url.partition(",")
            if not header.endswith(";base64"):
                raise ValueError("data: URLs must be base64 encoded (data:image/png;base64,...)")
            if len(payload) * 3 // 4 > REMOTE_IMAGE_MAX_BYTES:
                raise ValueError(f"it is larger than {REMOTE_IMAGE_MAX_BYTES} bytes (the limit of remote images too)")
            return load_image(base64.b64decode(payload, validate=True))
        if url.startswith(("http://", "https://")):
            if not config.allow_remote_images:
                raise APIError(
                    f"{param}: http(s) image URLs are not fetched by this server (start it with "
                    "--allow-remote-images); send the image as a data: URL instead.",
                    param=param,
                    code="remote_images_disabled",
                )
            return load_image(url, allow_remote=True)
        path = url.removeprefix("file://")
        if config.image_root is None:
            raise APIError(
                f"{param}: local image paths are not served (start the server with --image-root DIR); send the image "
                "as a data: URL instead.",
                param=param,
                code="local_images_disabled",
            )
        root = os.path.realpath(config.image_root)
        resolved = os.path.realpath(os.path.join(root, path))
        if os.path.commonpath([root, resolved]) != root:
            raise APIError(
                f"{param}: {path!r} is outside the server's --image-root.", param=param, code="image_outside_root"
            )
        return load_image(resolved)
    except APIError:
        raise
    except (ValueError, OSError, binascii.Error, PIL.Image.DecompressionBombError) as error:
        raise APIError(f"{param}: cannot open the image: {error}", param=param, code="invalid_image") from error


# Image tags in message text are refused: images come only from image_url items (never from a path in the text).
# ChatML control tokens typed in text stay plain text, as in the official `make_context` (the processor's chat
# template sanitizes them), so they need no check here.
def _check_text(text: str, param: str) -> str:
    """Refuse `<img>`/`</img>` in message text."""
    found = IMAGE_TAG.search(text)
    if found:
        raise APIError(
            f"{param}: text may not contain {found.group()!r} (image tags are refused); send images as image_url "
            "items.",
            param=param,
            code="invalid_content_item",
        )
    return text


def _template_messages(request: ChatCompletionRequest, config: ServerConfig) -> tuple[list[dict], list]:
    """OpenAI messages → (messages for the processor's chat template, the images in order)."""
    messages, images = [], []
    for m, message in enumerate(request.messages):
        if message.content is None or isinstance(message.content, str):
            messages.append(
                {"role": message.role, "content": _check_text(message.content or "", f"messages[{m}].content")}
            )
            continue
        items = []
        for i, item in enumerate(message.content):
            param = f"messages[{m}].content[{i}]"
            kind = item.get("type")
            if kind == "text" and isinstance(item.get("text"), str):
                items.append({"type": "text", "text": _check_text(item["text"], param)})
            elif kind == "image_url":
                image_url = item.get("image_url")
                url = image_url.get("url") if isinstance(image_url, dict) else image_url
                if not isinstance(url, str) or not url:
                    raise APIError(
                        f'{param}: an image_url item needs {{"image_url": {{"url": "data:image/png;base64,..."}}}}.',
                        param=param,
                        code="invalid_content_item",
                    )
                images.append(_open_image(url, param, config))
                items.append({"type": "image", "image": images[-1]})
            else:
                raise APIError(
                    f"{param}: expected {{'type': 'text', 'text': str}} or {{'type': 'image_url', 'image_url': "
                    f"{{'url': str}}}}, got {json.dumps(item)[:200]}.",
                    param=param,
                    code="invalid_content_item",
                )
        messages.append({"role": message.role, "content": items})
    return messages, images


# ---------------------------------------------------------------------------------------------------------------
# Batched generation


@dataclass
class Job:
    """One request: `n` rows of the same prompt, generated in a batch with other jobs of the same `sampling` key."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None
    n: int
    max_tokens: int
    sampling: tuple  # (do_sample, temperature, top_p, seed): only jobs with equal keys share a batch
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(
        default_factory=asyncio.Queue
    )  # ("delta", row, text) ... ("done", rows) / ("error", message)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


@dataclass
class Row:
    """The generation state of one choice of a job."""

    job: Job
    index: int
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already emitted
    finish_reason: str | None = None


class RowStops(StoppingCriteria):
    """
    Per-row bookkeeping of a batch, run by `generate` after every step: records each row's new token, emits its new
    text to the row's job, and stops a row at an end id ("stop"), a stop string ("stop"), its own `max_tokens`
    ("length") or its job's cancellation ("cancelled"). Hand-written because transformers' streamers only support
    batch size 1 and its stop criteria apply one setting to the whole batch.
    """

    def __init__(self, rows: list[Row], end_ids: list[int], tokenizer):
        self.rows, self.end_ids, self.tokenizer = rows, set(end_ids), tokenizer

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        last = input_ids[:, -1].tolist()
        for row, token in zip(self.rows, last):
            if row.finish_reason is None:
                self._step(row, token)
        return torch.tensor([row.finish_reason is not None for row in self.rows], device=input_ids.device)

    def _step(self, row: Row, token: int) -> None:
        job = row.job
        if job.cancelled.is_set():
            row.finish_reason = "cancelled"
            return
        row.tokens.append(token)
        if token in self.end_ids:
            row.finish_reason = "stop"
        else:
            row.text = self.tokenizer.decode(row.tokens, skip_special_tokens=False)
            cut = min((i for i in (row.text.find(s) for s in job.stop) if i >= 0), default=-1)
            if cut >= 0:
                row.text, row.finish_reason = row.text[:cut], "stop"
            elif len(row.tokens) >= job.max_tokens:
                row.finish_reason = "length"
        # Hold back what could still become a stop string or an incomplete character.
        hold = 0 if row.finish_reason else max((len(s) - 1 for s in job.stop), default=0)
        visible = len(row.text) - hold
        while visible > row.sent and row.text[visible - 1] == "\ufffd" and not row.finish_reason:
            visible -= 1
        if visible > row.sent:
            job.emit("delta", row.index, row.text[row.sent : visible])
            row.sent = visible


class Batcher:
    """
    One worker thread that runs `generate` on batches of queued jobs: it takes the oldest job, waits `batch_wait`
    seconds for others, adds the queued jobs with the same sampling settings (up to `max_batch_size` rows) and
    generates them as one left-padded batch. Jobs report through their `events` queue.
    """

    def __init__(self, model, processor, max_batch_size: int = 8, batch_wait: float = 0.01):
        self.model, self.processor = model, processor
        self.tokenizer = processor.tokenizer
        self.end_ids = reply_end_ids(model, self.tokenizer)
        self.max_batch_size, self.batch_wait = max_batch_size, batch_wait
        self.pending: list[Job] = []
        self.condition = threading.Condition()
        self.batch_sizes: list[int] = []  # rows of each batch run, for inspection and benchmarks
        self.finished: list[tuple[str, int]] = []  # (finish_reason, tokens) of each row
        self._stop = False
        self.thread = threading.Thread(target=self._run, name="qwen-vl-batcher", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.condition:
            self.pending.append(job)
            self.condition.notify()

    def close(self) -> None:
        with self.condition:
            self._stop = True
            self.condition.notify()
        self.thread.join(timeout=30)

    def _next_batch(self) -> list[Job] | None:
        with self.condition:
            while not self.pending and not self._stop:
                self.condition.wait()
            if self._stop:
                return None
        time.sleep(self.batch_wait)
        with self.condition:
            first = self.pending.pop(0)
            batch, rows = [first], first.n
            for job in list(self.pending):
                if job.sampling == first.sampling and rows + job.n <= self.max_batch_size:
                    self.pending.remove(job)
                    batch.append(job)
                    rows += job.n
            return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            batch = [job for job in batch if not job.cancelled.is_set()]
            if not batch:
                continue
            try:
                rows = self._generate(batch)
            except Exception as error:  # a failed batch fails its requests, not the server
                for job in batch:
                    job.emit("error", f"generation failed: {type(error).__name__}: {error}")
                continue
            for job in batch:
                job.emit("done", [row for row in rows if row.job is job])

    @torch.inference_mode()
    def _generate(self, batch: list[Job]) -> list[Row]:
        rows = [Row(job, index) for job in batch for index in range(job.n)]
        padded = self.tokenizer.pad(
            {"input_ids": [row.job.input_ids for row in rows]}, padding=True, padding_side="left", return_tensors="pt"
        )
        inputs = {key: value.to(self.model.device) for key, value in padded.items()}
        pixels = [row.job.pixel_values for row in rows if row.job.pixel_values is not None]
        if pixels:
            inputs["pixel_values"] = torch.cat(pixels).to(self.model.device, self.model.dtype)
        do_sample, temperature, top_p, seed = batch[0].sampling
        sampling = {"do_sample": do_sample}
        if do_sample:
            sampling.update(
                {key: value for key, value in (("temperature", temperature), ("top_p", top_p)) if value is not None}
            )
            if seed is not None:
                torch.manual_seed(seed)
        else:
            sampling.update(temperature=None, top_p=None, top_k=None)
        self.batch_sizes.append(len(rows))
        self.model.generate(
            **inputs,
            **sampling,
            max_new_tokens=max(job.max_tokens for job in batch),
            eos_token_id=self.end_ids,
            pad_token_id=self.tokenizer.eod_id,
            stopping_criteria=StoppingCriteriaList([RowStops(rows, self.end_ids, self.tokenizer)]),
        )
        for row in rows:
            row.finish_reason = row.finish_reason or "length"
            self.finished.append((row.finish_reason, len(row.tokens)))
        return rows


# ---------------------------------------------------------------------------------------------------------------
# The app


def create_app(model, processor, config: ServerConfig) -> FastAPI:
    """The FastAPI app serving `model` as `config.model_name`; its batcher is `app.state.batcher`."""
    batcher = Batcher(model, processor, config.max_batch_size, config.batch_wait)
    context = model.config.max_position_embeddings
    default_max_tokens = getattr(model.generation_config, "max_new_tokens", None) or 512

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(batcher.close)

    app = FastAPI(title="Qwen-VL OpenAI-compatible server", lifespan=lifespan)
    app.state.batcher = batcher

    @app.exception_handler(APIError)
    async def api_error(request, error: APIError):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        param = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        return APIError(f"Invalid request: {param}: {first.get('msg', error)}", param=param).response()

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": config.model_name, "object": "model", "created": 0, "owned_by": "qwen-vl"}],
        }

    def prepare(request: ChatCompletionRequest, loop) -> tuple[Job, list]:
        """Validate `request` and build its job (runs in a worker thread: images may be fetched)."""
        if request.model != config.model_name:
            raise APIError(
                f"The model {request.model!r} does not exist: this server serves {config.model_name!r}.",
                status=404,
                param="model",
                code="model_not_found",
            )
        if request.n > config.max_batch_size:
            raise APIError(
                f"n={request.n} is more than this server's --max-batch-size ({config.max_batch_size}).", param="n"
            )
        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        if len(stop) > 4 or not all(stop):
            raise APIError("stop must be a non-empty string or a list of at most 4 non-empty strings.", param="stop")
        messages, images = _template_messages(request, config)
        try:
            # Tokenized by the template: typed control tokens stay text, and images come only from the image items.
            encoded = processor.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt"
            )
        except ValueError as error:
            raise APIError(f"messages: {error}", param="messages", code="invalid_content") from error
        input_ids = encoded["input_ids"][0].tolist()
        requested = request.max_completion_tokens or request.max_tokens
        max_tokens = requested or min(default_max_tokens, context - len(input_ids))
        if max_tokens < 1 or len(input_ids) + max_tokens > context:
            raise APIError(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{len(input_ids) + max_tokens} tokens ({len(input_ids)} in the messages, {max_tokens} in the "
                "completion). Please reduce the length of the messages or the completion.",
                param="messages",
                code="context_length_exceeded",
            )
        greedy = request.temperature == 0
        sampling = (False, None, None, None) if greedy else (True, request.temperature, request.top_p, request.seed)
        if request.temperature is None and request.top_p is None and not model.generation_config.do_sample:
            sampling = (False, None, None, None)  # the repo's own default decoding is greedy
        job = Job(input_ids, encoded.get("pixel_values"), request.n, max_tokens, sampling, stop, loop)
        return job, images

    def grounding(text: str, images: list) -> list[dict] | None:
        if not images or not parse_grounding(text):
            return None
        return [
            {
                "image": index,
                "width": image.width,
                "height": image.height,
                "boxes": [
                    {**box, "box": list(box["box"])} for box in processor.post_process_grounding(text, image.size)
                ],
            }
            for index, image in enumerate(images)
        ]

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, http_request: Request):
        loop = asyncio.get_running_loop()
        job, images = await asyncio.to_thread(prepare, request, loop)
        batcher.submit(job)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": completion_id, "created": created, "model": config.model_name}

        def usage(rows) -> dict:
            completion = sum(len(row.tokens) for row in rows)
            return {
                "prompt_tokens": len(job.input_ids),
                "completion_tokens": completion,
                "total_tokens": len(job.input_ids) + completion,
            }

        if request.stream:
            return StreamingResponse(stream(job, base, usage, request), media_type="text/event-stream")

        try:
            while True:
                try:
                    event = await asyncio.wait_for(job.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http_request.is_disconnected():
                        return JSONResponse({}, status_code=499)  # nobody reads it; `finally` stops the job
                    continue
                if event[0] == "error":
                    raise APIError(event[1], status=500)
                if event[0] == "done":
                    break
        finally:
            job.cancelled.set()  # no-op once done
        rows = event[1]
        choices = []
        for row in rows:
            message = {"role": "assistant", "content": row.text}
            boxes = grounding(row.text, images)
            if boxes is not None:
                message["grounding"] = boxes
            choices.append(
                {"index": row.index, "message": message, "finish_reason": row.finish_reason, "logprobs": None}
            )
        return {**base, "object": "chat.completion", "choices": choices, "usage": usage(rows)}

    async def stream(job: Job, base: dict, usage, request: ChatCompletionRequest):
        """Server-sent events in the OpenAI chunk format, ending with `data: [DONE]`; a client that goes away
        cancels the job (the worker stops its rows at the next step)."""

        def chunk(choices, **extra) -> str:
            return f"data: {json.dumps({**base, 'object': 'chat.completion.chunk', 'choices': choices, **extra})}\n\n"

        try:
            for index in range(job.n):
                yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            while True:
                event = await job.events.get()
                if event[0] == "delta":
                    yield chunk([{"index": event[1], "delta": {"content": event[2]}, "finish_reason": None}])
                elif event[0] == "error":
                    yield f"data: {json.dumps({'error': {'message': event[1], 'type': 'server_error'}})}\n\n"
                    break
                else:
                    for row in event[1]:
                        yield chunk([{"index": row.index, "delta": {}, "finish_reason": row.finish_reason}])
                    if request.stream_options and request.stream_options.include_usage:
                        yield chunk([], usage=usage(event[1]))
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # no-op once done; stops generation when the client disconnected mid-stream

    return app


def build_parser() -> argparse.ArgumentParser:
    parser = model_parser("qwen-vl serve", __doc__.split("\n\n")[0].strip(), port=8000)
    parser.add_argument("--max-batch-size", type=int, default=8, help="most rows generated together (default 8)")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0, help="wait for more requests before a batch")
    parser.add_argument("--served-model-name", help="the `model` clients send (default: the repo's directory name)")
    parser.add_argument("--image-root", help="serve local image paths (and file:// URLs) under this directory")
    parser.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs")
    return parser


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args = build_parser().parse_args(argv)
    if args.max_batch_size < 1:
        raise SystemExit("qwen-vl serve: --max-batch-size must be at least 1")
    model, processor = load_model(args.model, args.dtype, args.device)
    config = ServerConfig(
        model_name=args.served_model_name or Path(args.model.rstrip("/")).name,
        max_batch_size=args.max_batch_size,
        batch_wait=args.batch_wait_ms / 1000,
        image_root=args.image_root,
        allow_remote_images=args.allow_remote_images,
    )
    uvicorn.run(create_app(model, processor, config), host=args.host, port=args.port)
    return 0
