"""The OpenAI-compatible HTTP front (FastAPI through ``@serve.ingress``).

It tokenizes (so the router can size requests in pages), validates, and streams replies over SSE.
Bad input is a 400 with an OpenAI-style error body (``cluster.api_errors``); a wrong API key is a
401 and a body too big for any prompt that fits the context a 413, refused before it is parsed
(``cluster.request_guards``); a client that goes away cancels its request, which frees its slot.
Tokenizing runs in a thread, off the event loop, so ``/health`` and other requests are answered
meanwhile; a prompt with more characters than the context could hold is refused before it is
tokenized (``cluster.openai.limits``). The bodies are ``cluster.openai``'s.

``GET /metrics`` is the Prometheus endpoint of the whole app (see ``cluster.metrics``): the
replicas' series from the metrics hub, which this ingress creates and owns, plus the decisions of
the free-page router, which runs in this process (its handle to the replicas routes here). Like
``/health`` it needs no API key: only ``/v1/`` paths do.
"""

# NOTE: no ``from __future__ import annotations`` here: ``@serve.ingress`` copies the app
# (cloudpickle), and the copy's endpoints keep only the module names their code uses, so FastAPI
# could not resolve a body's model written as a string (``CompletionRequest``) in the replica and
# took it for a query parameter. Evaluated annotations are the classes themselves.

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response, StreamingResponse
from jinja2 import TemplateError
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from cluster import routing
from cluster.api_errors import (
    ApiError,
    add_error_handlers,
    context_exceeded,
    json_response,
    replica_lost,
)
from cluster.metrics.render import MetricsExporter, RouterView
from cluster.metrics.store import ReplicaSeries
from cluster.metrics_hub import create_hub
from cluster.openai.limits import RequestLimits
from cluster.openai.logprobs import Logprobs, TokenStrings
from cluster.openai.requests import ChatCompletionRequest, CompletionRequest, SamplingFields
from cluster.openai.responses import (
    ChatChoice,
    CompletionChoice,
    chat_choice,
    completion_choice,
    error_payload,
    model_card,
    model_list,
    new_id,
    reply_body,
)
from cluster.openai.streaming import DONE, ReplyStream, merged, sse_event
from cluster.openai.tool_calls import Tools, emits_hermes_tool_calls, parse_tool_calls
from cluster.protocol import GenerateRequest, ModelInfo, served_model_name
from cluster.request_guards import BodyLimit, check_api_key
from replica.errors import ReplicaBroken, RequestRejected
from replica.model.source import apply_chat_template
from replica.request import RequestOutput
from replica.sampling_params import GuidedDecoding, default_max_tokens

log = logging.getLogger(__name__)
app = FastAPI(title="vattn", description="OpenAI-compatible LLM serving on vAttention")
add_error_handlers(app)


async def _ingress_limits() -> RequestLimits:
    ingress: VattnIngress = serve.get_replica_context().servable_object
    return await ingress.limits()


# Inside the API key's check (added below it, so it runs after it): no key, no body read.
app.add_middleware(BodyLimit, limit=_ingress_limits)
app.middleware("http")(check_api_key)


@dataclass(frozen=True)
class Reply:
    """One API call: its id and the replica's requests, one per choice (``n``)."""

    reply_id: str
    chat: bool
    requests: tuple[GenerateRequest, ...]

    @property
    def prompt_tokens(self) -> int:
        return self.requests[0].prompt_tokens


# NOTE: the class's helpers are defined above it: ``@serve.ingress`` copies the app (cloudpickle)
# as it decorates the class, and the copy sees only the module's names defined by then.
def _failure(message: str) -> str:
    """A stream's error event (its status went out with the first event: it stays 200)."""
    return sse_event(error_payload(message, "server_error"))


async def _events(stream: ReplyStream, responses: list[Any]) -> AsyncIterator[str]:
    """The reply's events as its choices' outputs come; a generation error or a replica that
    died ends it early with an error event. Every choice's request is cancelled at the end (a
    no-op when finished; it frees the slot when the client left)."""
    try:
        for chunk in stream.opening():
            yield sse_event(chunk)
        async with aclosing(merged(responses)) as outputs:
            async for index, output in outputs:
                if output.error:
                    yield _failure(f"generation failed: {output.error}")
                    break
                for chunk in stream.chunks(index, output):
                    yield sse_event(chunk)
        for chunk in stream.closing():
            yield sse_event(chunk)
    except (ReplicaBroken, RayActorError) as error:
        yield _failure(replica_lost(error))
    finally:
        for response in responses:
            response.cancel()
    yield sse_event(DONE)


@serve.deployment(max_ongoing_requests=1000)
@serve.ingress(app)
class VattnIngress:
    def __init__(self, replica: DeploymentHandle, model: str, api_key: str | None = None) -> None:
        from replica.model.source import load_tokenizer, resolve_model_dir

        self.replica = replica
        model_dir = resolve_model_dir(model)
        self.tokenizer = load_tokenizer(model_dir) if model_dir is not None else None
        self.tokens = TokenStrings(self.tokenizer)
        app.state.api_key = api_key or None
        self._info: ModelInfo | None = None
        self.model_name = served_model_name(model)
        self.hub = create_hub()  # owned by this ingress: it goes when the app goes
        self.exporter = MetricsExporter()

    async def info(self) -> ModelInfo:
        if self._info is None:
            self._info = await self.replica.model_info.remote()
        return self._info

    async def limits(self) -> RequestLimits:
        """How big a request may be (from the replica's context limit and this tokenizer)."""
        info = await self.info()
        return RequestLimits(info.max_model_len, self.tokens.max_bytes)

    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics(self) -> Response:
        series = await self.hub_series()
        decisions = RouterView(self.model_name, routing.DECISIONS.snapshot())
        body = self.exporter.render(series, decisions)
        return Response(body, media_type=CONTENT_TYPE_PLAIN_0_0_4)

    async def hub_series(self) -> list[ReplicaSeries]:
        """The hub's series; a dead hub is created again (its samples are gone: a counter reset)."""
        try:
            return await self.hub.series.remote()
        except RayActorError:
            log.warning("the metrics hub died; creating a new one")
            self.hub = create_hub()
            return await self.hub.series.remote()

    @app.get("/v1/models")
    async def models(self) -> Response:
        info = await self.info()
        return json_response(model_list(info.name, info.max_model_len))

    @app.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str) -> Response:
        """The served model's card (``client.models.retrieve``); any other id is a 404."""
        info = await self.info()
        if model_id != info.name:
            raise self.unknown_model(model_id, info)
        return json_response(model_card(info.name, info.max_model_len))

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest) -> Any:
        info = await self.check_model(body.model)
        limits = await self.limits()
        if isinstance(body.prompt, str):
            token_ids = await self.tokenize(body.prompt, limits, "prompt")
        else:
            token_ids = tuple(body.prompt)
        reply = self.reply("cmpl", token_ids, body, body.logprobs, limits, "prompt")
        return await self.answer(reply, info, body, body.logprobs)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest) -> Any:
        info = await self.check_model(body.model)
        if self.tokenizer is None:
            raise ApiError(
                400,
                "this model has no tokenizer, so no chat template: use /v1/completions with "
                "token ids",
            )
        limits = await self.limits()
        chars = sum(len(m.text()) for m in body.messages)
        if (too_long := limits.prompt_too_long(chars)) is not None:
            raise ApiError(400, too_long, param="messages", code="context_length_exceeded")
        mode = body.tool_mode()
        if mode == "auto" and not emits_hermes_tool_calls(
            getattr(self.tokenizer, "chat_template", None)
        ):
            raise ApiError(
                400,
                "tool_choice auto (the default with tools) needs a chat template that emits "
                "Hermes-style <tool_call> blocks, and this model's does not: use tool_choice "
                '"none", "required" or a named function {"type": "function", "function": '
                '{"name": ...}} (generated under that tool\'s JSON schema)',
                param="tool_choice",
                code="unsupported_value",
            )
        try:
            token_ids = await asyncio.to_thread(
                self.chat_ids, body.template_messages(), body.template_tools()
            )
        except TemplateError as error:  # e.g. a template that insists on alternating roles
            message = f"the model's chat template refused the conversation: {error}"
            raise ApiError(400, message, param="messages") from None
        logprobs_asked = body.logprobs_asked()
        reply = self.reply(
            "chatcmpl", token_ids, body, logprobs_asked, limits, "messages", body.guided()
        )
        named = body.tool_choice.function.name if mode == "named" else None  # type: ignore[union-attr]
        tools = Tools(mode, named) if mode in ("named", "required", "auto") else None
        return await self.answer(reply, info, body, logprobs_asked, tools)

    # ---- helpers -------------------------------------------------------------------------------
    async def answer(
        self,
        reply: Reply,
        info: ModelInfo,
        body: Any,
        logprobs_asked: int | None,
        tools: Tools | None = None,
    ) -> Any:
        """Sends the reply's requests (one per choice) and answers with their stream of chunks or
        the whole body."""
        streams: list[Any] = []
        try:
            for request in reply.requests:
                stream, accepted = await self.start(request)
                streams.append(stream)
        except BaseException:
            for stream in streams:
                stream.cancel()
            raise
        chat = reply.chat
        logprobs = [
            Logprobs(self.tokens, chat=chat) if logprobs_asked is not None else None
            for _ in streams
        ]
        if body.stream:
            return self.sse(reply, streams, accepted, info, logprobs, body.include_usage, tools)
        try:
            collected = await asyncio.gather(
                *(self.collect(stream, lp) for stream, lp in zip(streams, logprobs))
            )
        finally:
            for stream in streams:
                stream.cancel()  # a no-op when finished
        choices: list[CompletionChoice | ChatChoice] = []
        for index, ((text, last), lp) in enumerate(zip(collected, logprobs)):
            shaped = lp.take() if lp is not None else None
            if not chat:
                choices.append(completion_choice(index, text, last.finish_reason, shaped))
                continue
            calls = None
            if tools is not None:
                text, calls = parse_tool_calls(tools.mode, text, tools.named)
            choices.append(chat_choice(index, text, last.finish_reason, shaped, calls))
        completion_tokens = sum(last.completion_tokens for _, last in collected)
        body_out = reply_body(
            reply.reply_id,
            info.name,
            chat,
            choices,
            reply.prompt_tokens,
            completion_tokens,
            collected[0][1].cached_tokens,  # the prompt is counted once
        )
        return json_response(body_out, replica=accepted.replica or "")

    async def check_model(self, model: str | None) -> ModelInfo:
        info = await self.info()
        if model and model != info.name:
            raise self.unknown_model(model, info)
        return info

    @staticmethod
    def unknown_model(model: str, info: ModelInfo) -> ApiError:
        return ApiError(
            404,
            f"model {model!r} does not exist; this server serves {info.name!r}",
            "not_found_error",
            "model",
            "model_not_found",
        )

    async def tokenize(self, prompt: str, limits: RequestLimits, param: str) -> tuple[int, ...]:
        """Text to token ids here (the router sizes requests by them), in a thread so that the
        event loop goes on meanwhile; a prompt too long to fit by its characters alone is refused
        first. (Token-id prompts pass as they are: the replica's engine validates every request,
        ``LLMEngine.check``.)"""
        if self.tokenizer is None:
            message = "this model has no tokenizer: send the prompt as token ids"
            raise ApiError(400, message, param=param)
        if (too_long := limits.prompt_too_long(len(prompt))) is not None:
            raise ApiError(400, too_long, param=param, code="context_length_exceeded")
        return tuple(await asyncio.to_thread(self.tokenizer.encode, prompt))

    def chat_ids(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> tuple[int, ...]:
        """A conversation's prompt ids (the chat template, given the tools when there are any,
        then the tokenizer); run in a thread."""
        if tools and getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=True
            )
        else:
            text = apply_chat_template(self.tokenizer, messages)
        return tuple(self.tokenizer.encode(text))

    @staticmethod
    def reply(
        prefix: str,
        token_ids: tuple[int, ...],
        body: SamplingFields,
        logprobs: int | None,
        limits: RequestLimits,
        param: str,
        guided: GuidedDecoding | None = None,
    ) -> Reply:
        """The replica's requests, one per choice (``n``). Without max_tokens each may generate
        the rest of the context (as OpenAI and vLLM do), so a prompt that fills the context is
        refused here."""
        room = default_max_tokens(limits.context_tokens, len(token_ids))
        if room < 1:
            raise context_exceeded(len(token_ids), limits.context_tokens, param)
        reply_id = new_id(prefix)
        try:
            params = [
                body.sampling_params(logprobs, room, guided, choice)
                for choice in range(body.choices)
            ]
        except ValueError as error:
            raise ApiError(400, str(error)) from None
        ids = [reply_id] if len(params) == 1 else [f"{reply_id}-{i}" for i in range(len(params))]
        requests = tuple(GenerateRequest(i, token_ids, p) for i, p in zip(ids, params))
        return Reply(reply_id, prefix == "chatcmpl", requests)

    async def start(self, request: GenerateRequest) -> tuple[Any, RequestOutput]:
        """Sends the request to a replica and waits for its acceptance (the empty first delta):
        a request the engine rejects is a 400 before any response starts, streaming or not."""
        stream = self.replica.options(stream=True).generate.remote(request)
        try:
            accepted = await stream.__anext__()
        except RequestRejected as error:  # the engine's validation: never servable
            cause = getattr(error, "cause", None) or error
            raise ApiError(
                400,
                str(cause),
                param=getattr(cause, "param", None),
                code=getattr(cause, "code", None),
            ) from None
        except (ReplicaBroken, RayActorError) as error:  # Serve is replacing the replica
            raise ApiError(503, replica_lost(error), "server_error") from None
        return stream, accepted

    async def collect(self, stream: Any, logprobs: Logprobs | None) -> tuple[str, RequestOutput]:
        """The rest of an accepted request: its text and last delta; its tokens' logprobs go to
        ``logprobs``."""
        text, last = "", None
        try:
            async for output in stream:
                self.raise_failed(output)
                text += output.text
                if logprobs is not None:
                    logprobs.add_output(output)
                last = output
        except (ReplicaBroken, RayActorError) as error:  # Serve is replacing the replica
            raise ApiError(503, replica_lost(error), "server_error") from None
        assert last is not None
        return text, last

    @staticmethod
    def raise_failed(output: RequestOutput) -> None:
        if output.error:
            raise ApiError(500, f"generation failed: {output.error}", "server_error")

    def sse(
        self,
        reply: Reply,
        responses: list[Any],
        accepted: RequestOutput,
        info: ModelInfo,
        logprobs: list[Logprobs | None],
        include_usage: bool,
        tools: Tools | None,
    ) -> StreamingResponse:
        """The reply as server-sent events (``cluster.openai.streaming``), then ``data: [DONE]``."""
        stream = ReplyStream(
            reply.reply_id,
            info.name,
            reply.chat,
            reply.prompt_tokens,
            logprobs,
            include_usage,
            tools,
        )
        return StreamingResponse(
            _events(stream, responses),
            media_type="text/event-stream",
            headers={"x-vattn-replica": accepted.replica or ""},
        )
