"""The OpenAI-compatible HTTP front (FastAPI through ``@serve.ingress``).

It tokenizes (so the router can size requests in pages), validates, and streams replies over SSE.
Bad input is a 400 with an OpenAI-style error body; a wrong API key is a 401; a client that goes
away cancels its request, which frees its slot.

``GET /metrics`` is the Prometheus endpoint of the whole app (see ``cluster.metrics``): the
replicas' series from the metrics hub, which this ingress creates and owns, plus the decisions of
the free-page router, which runs in this process (its handle to the replicas routes here). Like
``/health`` it needs no API key: only ``/v1/`` paths do.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster import openai_api as api
from cluster import routing
from cluster.metrics import MetricsExporter, ReplicaSeries, RouterView
from cluster.metrics_hub import create_hub
from cluster.protocol import GenerateRequest, ModelInfo, served_model_name
from replica.errors import ReplicaBroken, RequestRejected
from replica.model.source import apply_chat_template
from replica.request import RequestOutput

log = logging.getLogger(__name__)
app = FastAPI(title="vattn", description="OpenAI-compatible LLM serving on vAttention")


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.payload = status, api.error_payload(message, kind, param, code)


@app.exception_handler(ApiError)
async def _api_error(_: Request, error: ApiError) -> JSONResponse:
    return JSONResponse(error.payload, status_code=error.status)


@app.exception_handler(Exception)
async def _unexpected(_: Request, error: Exception) -> JSONResponse:
    """Anything unforeseen is still an OpenAI-style body (the details go to the log, not out)."""
    log.exception("request failed", exc_info=error)
    return JSONResponse(api.error_payload("internal error", "server_error"), status_code=500)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
    problems = error.errors()
    first = problems[0] if problems else {}
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body" and first.get("type") != "json_invalid")
    message = "; ".join(_describe(e) for e in problems)
    return JSONResponse(api.error_payload(message or "invalid request", param=where or None), status_code=400)


def _describe(problem: Any) -> str:
    if problem.get("type") == "json_invalid":
        return f"the body is not valid JSON ({problem.get('ctx', {}).get('error', 'parse error')})"
    where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body") or "body"
    return f"{where}: {problem.get('msg')}"


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
    return JSONResponse(api.error_payload(str(error.detail), kind), status_code=error.status_code)


@app.middleware("http")
async def _authorize(request: Request, call_next: Any) -> Any:
    expected = getattr(request.app.state, "api_key", None)
    if expected and "/v1/" in request.url.path:
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(given.encode(), expected.encode()):
            return JSONResponse(api.error_payload("invalid or missing API key", "authentication_error",
                                                  code="invalid_api_key"), status_code=401)
    return await call_next(request)


def _rejection(error: RequestRejected) -> str:
    """The replica's reason, without Ray's traceback (which names hosts and pids)."""
    return str(getattr(error, "cause", None) or error)


def _json(body: dict[str, Any], accepted: RequestOutput) -> JSONResponse:
    """The body, with the replica that served it in a header (for operators and tests)."""
    return JSONResponse(body, headers={"x-vattn-replica": accepted.replica or ""})


@serve.deployment(max_ongoing_requests=1000)
@serve.ingress(app)
class VattnIngress:
    def __init__(self, replica: DeploymentHandle, model: str, api_key: str | None = None) -> None:
        from replica.model.source import load_tokenizer, resolve_model_dir

        self.replica = replica
        model_dir = resolve_model_dir(model)
        self.tokenizer = load_tokenizer(model_dir) if model_dir is not None else None
        app.state.api_key = api_key or None
        self._info: ModelInfo | None = None
        self.model_name = served_model_name(model)
        self.hub = create_hub()  # owned by this ingress: it goes when the app goes
        self.exporter = MetricsExporter()

    async def info(self) -> ModelInfo:
        if self._info is None:
            self._info = await self.replica.model_info.remote()
        return self._info

    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics(self) -> Response:
        series = await self.hub_series()
        body = self.exporter.render(series, RouterView(self.model_name, routing.DECISIONS.snapshot()))
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
    async def models(self) -> dict[str, Any]:
        info = await self.info()
        return {"object": "list", "data": [{"id": info.name, "object": "model", "created": 0,
                                            "owned_by": "vattn", "max_model_len": info.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(self, body: api.CompletionRequest) -> Any:
        info = await self.check_model(body.model)
        request = self.request(api.new_id("cmpl"), self.tokenize(body.prompt), body, body.logprobs)
        stream, accepted = await self.start(request)
        if body.stream:
            return self.sse(request, stream, accepted, info, chat=False)
        text, last, logprobs = await self.collect(stream)
        body_logprobs = {"token_logprobs": logprobs} if body.logprobs is not None else None
        return _json(api.completion_body(request.request_id, info.name, text, last.finish_reason,
                                         request.prompt_tokens, last.completion_tokens, body_logprobs), accepted)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: api.ChatCompletionRequest) -> Any:
        info = await self.check_model(body.model)
        if self.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer, so no chat template: use /v1/completions with token ids")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        prompt = apply_chat_template(self.tokenizer, messages)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        request = self.request(api.new_id("chatcmpl"), self.tokenize(prompt), body, logprobs)
        stream, accepted = await self.start(request)
        if body.stream:
            return self.sse(request, stream, accepted, info, chat=True)
        text, last, _ = await self.collect(stream)
        return _json(api.chat_body(request.request_id, info.name, text, last.finish_reason,
                                   request.prompt_tokens, last.completion_tokens), accepted)

    # ---- helpers -------------------------------------------------------------------------------
    async def check_model(self, model: str | None) -> ModelInfo:
        info = await self.info()
        if model and model != info.name:
            raise ApiError(404, f"model {model!r} does not exist; this server serves {info.name!r}",
                           "not_found_error", "model", "model_not_found")
        return info

    def tokenize(self, prompt: str | list[int]) -> tuple[int, ...]:
        """Text to token ids here (the router sizes requests by them); ids pass as they are: the
        replica's engine validates every request (``LLMEngine.check``)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ApiError(400, "this model has no tokenizer: send the prompt as token ids", param="prompt")
            return tuple(self.tokenizer.encode(prompt))
        return tuple(prompt)

    @staticmethod
    def request(request_id: str, token_ids: tuple[int, ...], body: api.SamplingFields,
                logprobs: int | None) -> GenerateRequest:
        try:
            params = body.sampling_params(logprobs)
        except ValueError as error:
            raise ApiError(400, str(error)) from None
        return GenerateRequest(request_id, token_ids, params)

    async def start(self, request: GenerateRequest) -> tuple[Any, RequestOutput]:
        """Sends the request to a replica and waits for its acceptance (the empty first delta):
        a request the engine rejects is a 400 before any response starts, streaming or not."""
        stream = self.replica.options(stream=True).generate.remote(request)
        try:
            accepted = await stream.__anext__()
        except RequestRejected as error:  # the engine's validation: never servable
            cause = getattr(error, "cause", None) or error
            raise ApiError(400, str(cause), param=getattr(cause, "param", None),
                           code=getattr(cause, "code", None)) from None
        except ReplicaBroken as error:  # a rank died: Serve is replacing the replica
            raise ApiError(503, f"the replica is unavailable, retry: {_rejection(error)}", "server_error") from None
        except RayActorError:  # the replica died: Serve is replacing it
            raise ApiError(503, "the replica serving this request died; retry", "server_error") from None
        return stream, accepted

    async def collect(self, stream: Any) -> tuple[str, RequestOutput, list[float]]:
        """The rest of an accepted request: its text, last delta and chosen tokens' logprobs."""
        text, logprobs, last = "", [], None
        try:
            async for output in stream:
                self.raise_failed(output)
                text += output.text
                logprobs += output.logprobs or ()
                last = output
        except ReplicaBroken as error:  # a rank died: Serve is replacing the replica
            raise ApiError(503, f"the replica is unavailable, retry: {_rejection(error)}", "server_error") from None
        except RayActorError:  # the replica died mid-request: Serve is replacing it
            raise ApiError(503, "the replica serving this request died; retry", "server_error") from None
        assert last is not None
        return text, last, logprobs

    @staticmethod
    def raise_failed(output: RequestOutput) -> None:
        if output.error:
            raise ApiError(500, f"generation failed: {output.error}", "server_error")

    def sse(self, request: GenerateRequest, response: Any, accepted: RequestOutput, info: ModelInfo,
            chat: bool) -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            try:
                if chat:
                    yield api.sse_event(api.chat_chunk(request.request_id, info.name, {"role": "assistant"}, None))
                async for output in response:
                    if output.error:
                        yield api.sse_event(api.error_payload(f"generation failed: {output.error}", "server_error"))
                        break
                    if chat:
                        chunk = api.chat_chunk(request.request_id, info.name, {"content": output.text} if output.text else {},
                                               output.finish_reason)
                    else:
                        chunk = api.completion_chunk(request.request_id, info.name, output.text, output.finish_reason)
                    if output.finished:
                        chunk["usage"] = api.usage(request.prompt_tokens, output.completion_tokens)
                    yield api.sse_event(chunk)
                yield "data: [DONE]\n\n"
            except ReplicaBroken as error:
                yield api.sse_event(api.error_payload(f"the replica is unavailable, retry: {_rejection(error)}",
                                                      "server_error"))
                yield "data: [DONE]\n\n"
            except RayActorError:
                yield api.sse_event(api.error_payload("the replica serving this request died; retry", "server_error"))
                yield "data: [DONE]\n\n"
            finally:
                response.cancel()  # a no-op when finished; frees the slot when the client left

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"x-vattn-replica": accepted.replica or ""})
