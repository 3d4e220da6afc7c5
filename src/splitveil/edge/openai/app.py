"""The OpenAI-compatible HTTP front of the device: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

Up to `EdgeSettings.concurrency` requests generate at once, each on a lane of its own: a fork of the split
(`SplitCausalLM.fork`: the same weights, its own head and tail KV caches, its own trunk session on its own
connection), on a worker thread, while the event loop keeps answering. The trunk server batches the lanes' decode
steps. Further requests wait for a free lane in arrival order. A streaming client that disconnects ends its
generation at the next token. With the trunk in process (`--local`) the lanes share one service, one frame at a
time (no batching); an attested (sealed) trunk connection has one lane.

Before a request's body is read, `guard.RequestGuard` checks its Host header, its API key, its size and the number
of requests in flight (`EdgeSettings`); the `splitveil edge` command makes a random key unless told `--no-auth`.

Responses follow the OpenAI shapes; `usage` counts prompt and generated tokens, and an extra top-level field
`splitveil` reports what crossed the split: bytes up and down (whole frames), round trips, the plan and the wire.
"""

import asyncio
import contextlib
import json
import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from splitveil.core.errors import ConfigError, SplitveilError, TransportError
from splitveil.edge.openai.schemas import APIError, ChatCompletionRequest, CompletionRequest, error_body

log = logging.getLogger(__name__)

# no `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at run time

DEFAULT_MAX_TOKENS = 256  # new tokens when a request does not say


class _Cancelled(Exception):
    """Raised from the token callback when a streaming client went away."""


DEFAULT_MAX_REQUEST_BYTES = 2**20  # the largest request body read (1 MiB: about 250,000 tokens of text)
DEFAULT_MAX_PENDING = 32  # requests waiting for the generation lock or running, at most
LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")  # the Host names served when none are given (any port)


@dataclass(frozen=True)
class EdgeSettings:
    model_name: str  # the id /v1/models lists and requests must name
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    api_key: str | None = None  # when set, requests must carry "Authorization: Bearer <api_key>"
    threads: int = 1  # torch threads of the generation thread
    allowed_hosts: tuple[str, ...] | None = LOCAL_HOSTS  # Host header entries served ("name" or "name:port"); None: all
    any_ip_host: bool = False  # also serve every IP-literal Host (an edge listening on all interfaces)
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # larger bodies get 413, read no further than this
    max_pending: int = DEFAULT_MAX_PENDING  # requests in flight (and bodies being read) beyond this get 429
    body_timeout: float = 30.0  # seconds a client may take to send its body (408 after)
    concurrency: int = 8  # generations at once, each with its own trunk session (requests beyond wait for a lane)
    speculate: str = "off"  # speculative decoding for every request (edge.speculative: prompt-lookup, self, off)
    draft_tokens: int = 3
    draft_policy: str = "adaptive"  # edge.generate.DRAFT_POLICIES


class EdgeEngine:
    """Runs generations of a `SplitCausalLM` on worker threads, up to `settings.concurrency` at once.

    Each concurrent generation has its own lane: a fork of the split (`SplitCausalLM.fork`: the same weights, its own
    edge KV caches and its own trunk session on its own connection), made when first needed and kept for later
    requests. The trunk server batches the lanes' decode steps as it batches any sessions'. More requests than lanes
    wait for a free one (the guard's `max_pending` bounds how many may wait)."""

    def __init__(self, lm, settings: EdgeSettings):
        if lm.tokenizer is None:
            raise ConfigError("the OpenAI front needs the model's tokenizer")
        self.lm = lm
        self.tokenizer = lm.tokenizer
        self.settings = settings
        self.context = int(getattr(lm.splittable.config, "max_position_embeddings", 0) or 8192)
        self.lanes: list = [lm]  # every lane made so far (closed at shutdown)
        self.free: asyncio.Queue | None = None  # lanes not generating (made on first use, on the serving loop)
        self.making = 0  # lanes being made
        self.executor = ThreadPoolExecutor(max_workers=settings.concurrency + 1, thread_name_prefix="splitveil-edge",
                                           initializer=_set_threads, initargs=(settings.threads,))
        self.created = int(time.time())
        self.stopping = threading.Event()  # set on shutdown: a running generation ends at its next token

    @contextlib.asynccontextmanager
    async def lane(self):
        """A lane to generate on: a free one, else a new fork while there are fewer than `concurrency`, else the next
        one freed."""
        if self.free is None:
            self.free = asyncio.Queue()
            self.free.put_nowait(self.lm)
        if self.free.empty() and len(self.lanes) + self.making < self.settings.concurrency:
            self.making += 1
            try:
                fork = await asyncio.get_running_loop().run_in_executor(self.executor, self.lm.fork)
            except Exception as error:  # noqa: BLE001 - a lane that cannot be made: wait for an existing one
                log.warning("could not open another trunk session (%s); requests share the %d open",
                            " ".join(str(error).split())[:200], len(self.lanes))
                fork = None
            finally:
                self.making -= 1
            if fork is not None:
                self.lanes.append(fork)
                self.free.put_nowait(fork)
        lm = await self.free.get()
        try:
            yield lm
        finally:
            self.free.put_nowait(lm)

    def _check_stop(self, generated: list[int]) -> None:
        if self.stopping.is_set():
            raise _Cancelled()

    # -- requests -> prompts and configs ---------------------------------------------------------------------

    def check_model(self, name: str) -> None:
        if name != self.settings.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{self.settings.model_name}'",
                           param="model", code="model_not_found")

    def chat_prompt(self, request: ChatCompletionRequest) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in request.messages]
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(ids)

    def completion_prompt(self, request: CompletionRequest) -> list[int]:
        prompt = request.prompt
        if isinstance(prompt, list) and isinstance(prompt[0], int):
            vocab = int(self.lm.splittable.lm_head.weight.shape[0])
            if any(not 0 <= t < vocab for t in prompt):
                raise APIError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
            return list(prompt)
        text = prompt[0] if isinstance(prompt, list) else prompt
        if not text.strip():
            raise APIError(400, "prompt: must not be empty", param="prompt")
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def config(self, request, prompt_ids: list[int]):
        """The GenerationConfig of a request: temperature 0 is greedy (what `splitveil generate` does)."""
        from splitveil.edge.generate import GenerationConfig

        budget = request.budget or self.settings.default_max_tokens
        if len(prompt_ids) + budget > self.context:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens; the prompt has "
                           f"{len(prompt_ids)} and max_tokens asks for {budget}", param="max_tokens",
                           code="context_length_exceeded")
        temperature = 1.0 if request.temperature is None else request.temperature
        top_p = 1.0 if request.top_p is None else request.top_p
        sample = temperature > 0
        return GenerationConfig(max_new_tokens=budget, do_sample=sample, temperature=temperature if sample else 1.0,
                                top_p=top_p if sample else 1.0, seed=request.seed, stop=request.stop_strings,
                                speculate=self.settings.speculate, draft_tokens=self.settings.draft_tokens,
                                draft_policy=self.settings.draft_policy)

    # -- generation ------------------------------------------------------------------------------------------

    async def generate(self, prompt_ids: list[int], config):
        async with self.lane() as lm:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.executor, lambda: lm.generate(prompt_ids, config,
                                                                                  on_token=self._check_stop))

    async def stream(self, prompt_ids: list[int], config):
        """Yields ("text", delta) while generating, then ("done", GenerationResult); ("error", APIError) on failure."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        gone = threading.Event()

        def on_token(generated: list[int]) -> None:
            if gone.is_set() or self.stopping.is_set():
                raise _Cancelled()
            loop.call_soon_threadsafe(queue.put_nowait, list(generated))

        async with self.lane() as lm:
            job = loop.run_in_executor(self.executor, lambda: lm.generate(prompt_ids, config, on_token=on_token))
            job.add_done_callback(lambda _: queue.put_nowait(None))
            sent = ""
            try:
                while (generated := await queue.get()) is not None:
                    text = settled_text(self.tokenizer, generated, config.stop)
                    if len(text) > len(sent) and text.startswith(sent):
                        yield "text", text[len(sent):]
                        sent = text
                try:
                    result = job.result()
                except Exception as error:  # noqa: BLE001 - reported to the client as an error event
                    yield "error", api_error(error)
                    return
                if len(result.text) > len(sent) and result.text.startswith(sent):
                    yield "text", result.text[len(sent):]
                yield "done", result
            finally:
                gone.set()  # a client that went away ends the generation at its next token
                try:
                    await job
                except Exception:  # noqa: BLE001 - already reported, or the client is gone
                    pass

    def close(self) -> None:
        """Ends a running generation at its next token, then closes the split's remote sessions and transport."""
        self.stopping.set()
        self.executor.shutdown(wait=True, cancel_futures=True)
        for lm in self.lanes:
            lm.close()


def settled_text(tokenizer, generated: list[int], stop: tuple[str, ...]) -> str:
    """The text of `generated` that later tokens cannot change: up to the first stop string, without a trailing
    incomplete UTF-8 character, and without an ending that could still become the start of a stop string."""
    text = tokenizer.decode(generated, skip_special_tokens=True)
    hits = [text.find(s) for s in stop if s and s in text]
    if hits:
        return text[: min(hits)]
    text = text.rstrip("\ufffd")
    hold = max((len(s) for s in stop if s), default=1) - 1
    return text[: len(text) - hold] if hold else text


def api_error(error: BaseException) -> APIError:
    if isinstance(error, APIError):
        return error
    if isinstance(error, TransportError):
        return APIError(502, f"the trunk server failed: {error.message}", type="server_error", code="trunk_unavailable")
    if isinstance(error, SplitveilError):
        return APIError(400, error.message)
    return APIError(500, "internal server error", type="server_error")


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


def usage(result) -> dict:
    prompt, completion = len(result.prompt_ids), len(result.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def split_report(lm, result) -> dict:
    """The extra `splitveil` field: the generated token ids and what crossed the split for this request."""
    return {"token_ids": result.token_ids, "bytes_up": result.bytes_up, "bytes_down": result.bytes_down, "round_trips": result.round_trips,
            "cuts": list(lm.plan.cuts), "wire": lm.wire, "prefill_seconds": round(result.prefill_seconds, 6),
            "decode_seconds": round(result.decode_seconds, 6)}


def build_app(lm, settings: EdgeSettings):
    """The FastAPI application serving `lm` (a `SplitCausalLM` with a tokenizer)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    from splitveil.edge.openai.guard import RequestGuard

    engine = EdgeEngine(lm, settings)
    app = FastAPI(title="splitveil edge", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    # Host, API key, body size and requests in flight are checked on the headers, before the body is read
    app.add_middleware(RequestGuard, allowed_hosts=settings.allowed_hosts, any_ip_host=settings.any_ip_host,
                       api_key=settings.api_key, max_request_bytes=settings.max_request_bytes,
                       max_pending=settings.max_pending, body_timeout=settings.body_timeout)

    @app.exception_handler(APIError)
    async def _api_error(_, error: APIError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, error: RequestValidationError):
        first = (error.errors() or [{}])[0]
        location = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        param = ".".join(location) or None
        return JSONResponse(error_body(f"{param}: {message}" if param else message, param=param), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, error: HTTPException):
        if error.status_code == 404:
            message = f"Unknown request URL: {request.method} {request.url.path}"
        else:
            message = str(error.detail)
        return JSONResponse(error_body(message, code=str(error.status_code)), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_, error: Exception):
        problem = api_error(error)
        return JSONResponse(problem.body(), status_code=problem.status)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(engine)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        engine.check_model(name)
        return _model_card(engine)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest):
        engine.check_model(request.model)
        prompt_ids = engine.chat_prompt(request)
        config = engine.config(request, prompt_ids)
        ident, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        head = {"id": ident, "created": created, "model": settings.model_name, "system_fingerprint": None}
        if request.stream:
            return _sse(_chat_events(engine, prompt_ids, config, head, request.include_usage))
        result = await _run(engine, prompt_ids, config)
        return {**head, "object": "chat.completion", "choices": [{
            "index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None,
            "finish_reason": FINISH[result.finish_reason]}], "usage": usage(result),
            "splitveil": split_report(engine.lm, result)}

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest):
        engine.check_model(request.model)
        prompt_ids = engine.completion_prompt(request)
        config = engine.config(request, prompt_ids)
        ident, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        head = {"id": ident, "object": "text_completion", "created": created, "model": settings.model_name,
                "system_fingerprint": None}
        if request.stream:
            return _sse(_completion_events(engine, prompt_ids, config, head, request.include_usage))
        result = await _run(engine, prompt_ids, config)
        return {**head, "choices": [{"index": 0, "text": result.text, "logprobs": None,
                                     "finish_reason": FINISH[result.finish_reason]}],
                "usage": usage(result), "splitveil": split_report(engine.lm, result)}

    def _sse(events):
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


async def _run(engine: EdgeEngine, prompt_ids: list[int], config):
    try:
        return await engine.generate(prompt_ids, config)
    except Exception as error:  # noqa: BLE001 - answered in the OpenAI shape
        raise api_error(error) from None


def _model_card(engine: EdgeEngine) -> dict:
    return {"id": engine.settings.model_name, "object": "model", "created": engine.created, "owned_by": "splitveil"}


def _event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def _chat_events(engine: EdgeEngine, prompt_ids, config, head: dict, include_usage: bool):
    chunk = {**head, "object": "chat.completion.chunk"}

    def choice(delta: dict, finish=None) -> dict:
        return {**chunk, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    yield _event(choice({"role": "assistant", "content": ""}))
    async for kind, value in engine.stream(prompt_ids, config):
        if kind == "text":
            yield _event(choice({"content": value}))
        elif kind == "error":
            yield _event(value.body())
            return
        else:
            yield _event({**choice({}, FINISH[value.finish_reason]), "splitveil": split_report(engine.lm, value)})
            if include_usage:
                yield _event({**chunk, "choices": [], "usage": usage(value)})
    yield "data: [DONE]\n\n"


async def _completion_events(engine: EdgeEngine, prompt_ids, config, head: dict, include_usage: bool):
    def choice(text: str, finish=None) -> dict:
        return {**head, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

    async for kind, value in engine.stream(prompt_ids, config):
        if kind == "text":
            yield _event(choice(value))
        elif kind == "error":
            yield _event(value.body())
            return
        else:
            yield _event({**choice("", FINISH[value.finish_reason]), "splitveil": split_report(engine.lm, value)})
            if include_usage:
                yield _event({**head, "choices": [], "usage": usage(value)})
    yield "data: [DONE]\n\n"
