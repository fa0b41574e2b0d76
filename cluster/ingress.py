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
from cluster.protocol import GenerateRequest, ModelInfo
from cluster.replica_deployment import served_model_name
from replica.engine import RequestRejected
from replica.llm import apply_chat_template
from replica.model import ModelConfig
from replica.request import RequestOutput
from replica.tp import ReplicaBroken

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


def _json(body: dict[str, Any], last: RequestOutput) -> JSONResponse:
    """The body, with the replica that served it in a header (for operators and tests)."""
    return JSONResponse(body, headers={"x-vattn-replica": last.replica or ""})


@serve.deployment(max_ongoing_requests=1000)
@serve.ingress(app)
class VattnIngress:
    def __init__(self, replica: DeploymentHandle, model: str, api_key: str | None = None) -> None:
        from replica.engine import load_tokenizer, resolve_model_dir

        self.replica = replica
        model_dir = resolve_model_dir(model)
        self.tokenizer = load_tokenizer(model_dir) if model_dir is not None else None
        # Token-id prompts must index the embedding: one id outside it would fail the whole step.
        self.vocab_size = (ModelConfig.from_hf_dir(model_dir) if model_dir else ModelConfig.llama3_8b()).vocab_size
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
        token_ids = self.tokenize(body.prompt)
        request = self.request(api.new_id("cmpl"), token_ids, body, body.logprobs, info)
        if body.stream:
            return self.sse(request, info, chat=False)
        text, last = await self.collect(request)
        logprobs = {"token_logprobs": list(last[1])} if body.logprobs is not None else None
        return _json(api.completion_body(request.request_id, info.name, text, last[0].finish_reason,
                                         request.prompt_tokens, last[0].completion_tokens, logprobs), last[0])

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: api.ChatCompletionRequest) -> Any:
        info = await self.check_model(body.model)
        if self.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer, so no chat template: use /v1/completions with token ids")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        prompt = apply_chat_template(self.tokenizer, messages)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        request = self.request(api.new_id("chatcmpl"), self.tokenize(prompt), body, logprobs, info)
        if body.stream:
            return self.sse(request, info, chat=True)
        text, last = await self.collect(request)
        return _json(api.chat_body(request.request_id, info.name, text, last[0].finish_reason,
                                   request.prompt_tokens, last[0].completion_tokens), last[0])

    # ---- helpers -------------------------------------------------------------------------------
    async def check_model(self, model: str | None) -> ModelInfo:
        info = await self.info()
        if model and model != info.name:
            raise ApiError(404, f"model {model!r} does not exist; this server serves {info.name!r}",
                           "not_found_error", "model", "model_not_found")
        return info

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ApiError(400, "this model has no tokenizer: send the prompt as token ids", param="prompt")
            return list(self.tokenizer.encode(prompt))
        bad = next((t for t in prompt if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is outside the vocabulary [0, {self.vocab_size})", param="prompt")
        return list(prompt)

    def request(self, request_id: str, token_ids: list[int], body: api.SamplingFields,
                logprobs: int | None, info: ModelInfo) -> GenerateRequest:
        try:
            params = body.sampling_params(logprobs)
        except ValueError as error:
            raise ApiError(400, str(error)) from None
        if not token_ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        total = len(token_ids) + params.max_tokens
        if total > info.max_model_len:
            raise ApiError(400, f"prompt ({len(token_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} "
                                f"exceeds the context limit of {info.max_model_len} tokens", param="max_tokens",
                           code="context_length_exceeded")
        return GenerateRequest(request_id, tuple(token_ids), params)

    def stream(self, request: GenerateRequest) -> Any:
        return self.replica.options(stream=True).generate.remote(request)

    async def collect(self, request: GenerateRequest) -> tuple[str, tuple[RequestOutput, list[float]]]:
        text, logprobs, last = "", [], None
        try:
            async for output in self.stream(request):
                self.raise_failed(output)
                text += output.text
                logprobs += output.logprobs or ()
                last = output
        except RequestRejected as error:  # the replica's cache can never hold it
            raise ApiError(400, _rejection(error), param="max_tokens") from None
        except ReplicaBroken as error:  # a rank died: Serve is replacing the replica
            raise ApiError(503, f"the replica is unavailable, retry: {_rejection(error)}", "server_error") from None
        except RayActorError:  # the replica died mid-request: Serve is replacing it
            raise ApiError(503, "the replica serving this request died; retry", "server_error") from None
        assert last is not None
        return text, (last, logprobs)

    @staticmethod
    def raise_failed(output: RequestOutput) -> None:
        if output.error:
            raise ApiError(500, f"generation failed: {output.error}", "server_error")

    def sse(self, request: GenerateRequest, info: ModelInfo, chat: bool) -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            response = self.stream(request)
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
            except RequestRejected as error:  # raised before the first token
                yield api.sse_event(api.error_payload(_rejection(error), param="max_tokens"))
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

        return StreamingResponse(events(), media_type="text/event-stream")
