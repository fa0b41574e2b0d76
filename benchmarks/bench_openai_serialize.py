"""Serialising a stream: 10,000 chat chunks built and framed as server-sent events three ways.

    python -m benchmarks.bench_openai_serialize           # 10,000 chunks, best of 5, seconds
    python -m benchmarks.bench_openai_serialize --smoke   # 200 chunks, once (CI)

Ways (each builds every chunk from the same token, then writes ``data: <JSON>``):
  dicts         hand-built dicts and ``json.dumps`` (the API's bodies before ``cluster.openai``)
  openai-types  the ``openai`` package's types (``ChatCompletionChunk`` ...), validated as they are
                built, ``model_dump_json(exclude_unset=True)``
  ours          ``cluster.openai.responses``' models and ``streaming.sse_event`` (what the
                ingress sends)

Workloads: ``content`` (a one-token content delta, no logprobs) and ``logprobs`` (the same with
the token's logprob, bytes and 5 top logprobs). Per way: the best wall time of ``--chunks``
chunks over ``--repeats`` rounds (the ways take turns in each), in µs a chunk; and whether the
three ways' chunks hold the same JSON (``created`` aside).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from openai.types.chat import ChatCompletionChunk, ChatCompletionTokenLogprob
from openai.types.chat import chat_completion_chunk as oa
from openai.types.chat.chat_completion_token_logprob import TopLogprob as OpenAITopLogprob

from benchmarks.environment import describe_device, save
from cluster.openai import responses
from cluster.openai.streaming import sse_event

REPLY_ID, MODEL = "chatcmpl-0123456789abcdef01234567", "SmolLM2-135M-Instruct"
TOPS = 5


@dataclass(frozen=True)
class Token:
    """What a chunk carries: the token's text, and with logprobs its own and its top ones."""

    text: str
    logprob: float | None  # None: no logprobs asked
    top: tuple[tuple[str, float], ...]


def tokens(count: int, logprobs: bool) -> list[Token]:
    words = [f" word{i}" for i in range(97)]
    return [
        Token(
            words[i % 97],
            -0.25 if logprobs else None,
            tuple((words[(i + k) % 97], -1.0 - k) for k in range(TOPS)) if logprobs else (),
        )
        for i in range(count)
    ]


def _entry(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def dict_chunk(token: Token) -> str:
    logprobs = None
    if token.logprob is not None:
        entry = _entry(token.text, token.logprob)
        entry["top_logprobs"] = [_entry(text, lp) for text, lp in token.top]
        logprobs = {"content": [entry], "refusal": None}
    choice = {"index": 0, "delta": {"content": token.text}, "logprobs": logprobs}
    choice["finish_reason"] = None
    body = {"id": REPLY_ID, "object": "chat.completion.chunk", "created": int(time.time())}
    body |= {"model": MODEL, "choices": [choice]}
    return f"data: {json.dumps(body)}\n\n"


def openai_chunk(token: Token) -> str:
    logprobs = None
    if token.logprob is not None:
        top = [OpenAITopLogprob(**_entry(text, lp)) for text, lp in token.top]
        entry = ChatCompletionTokenLogprob(**_entry(token.text, token.logprob), top_logprobs=top)
        logprobs = oa.ChoiceLogprobs(content=[entry], refusal=None)
    delta = oa.ChoiceDelta(content=token.text)
    choice = oa.Choice(index=0, delta=delta, logprobs=logprobs, finish_reason=None)
    body = ChatCompletionChunk(
        id=REPLY_ID,
        object="chat.completion.chunk",
        created=int(time.time()),
        model=MODEL,
        choices=[choice],
    )
    return f"data: {body.model_dump_json(exclude_unset=True)}\n\n"


def our_chunk(token: Token) -> str:
    logprobs = None
    if token.logprob is not None:
        top = [responses.TopLogprob(**_entry(text, lp)) for text, lp in token.top]
        entry = responses.TokenLogprob(**_entry(token.text, token.logprob), top_logprobs=top)
        logprobs = responses.ChatLogprobs(content=[entry], refusal=None)
    delta = responses.Delta(content=token.text)
    return sse_event(responses.chat_chunk(REPLY_ID, MODEL, delta, None, logprobs))


WAYS: dict[str, Callable[[Token], str]] = {
    "dicts": dict_chunk,
    "openai-types": openai_chunk,
    "ours": our_chunk,
}


def best_seconds(workload: list[Token], repeats: int) -> dict[str, float]:
    """Each way's best time over ``repeats`` rounds, the ways taking turns within a round (so a
    busy moment of a shared machine does not fall on one way alone)."""
    best = dict.fromkeys(WAYS, float("inf"))
    for _ in range(repeats):
        for name, way in WAYS.items():
            start = time.perf_counter()
            for token in workload:
                way(token)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def same_content(workload: list[Token]) -> bool:
    """Whether every way's chunks hold the same JSON value (``created`` aside)."""

    def value(event: str) -> Any:
        body = json.loads(event.removeprefix("data: "))
        body.pop("created")
        return body

    def shown(event: str) -> str:
        return json.dumps(value(event), sort_keys=True)

    return all(len({shown(way(t)) for way in WAYS.values()}) == 1 for t in workload)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="200 chunks, once (CI)")
    parser.add_argument("--chunks", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="results directory (default benchmarks/results)")
    args = parser.parse_args(argv)
    chunks, repeats = (200, 1) if args.smoke else (args.chunks, args.repeats)
    results: dict[str, dict[str, Any]] = {}
    same = True
    for workload_name, logprobs in (("content", False), ("logprobs", True)):
        workload = tokens(chunks, logprobs)
        same = same and same_content(workload[:50])
        results[workload_name] = {}
        for way in WAYS.values():
            way(workload[0])  # warm: the first call builds pydantic's validators
        for name, seconds in best_seconds(workload, repeats).items():
            row = {"total_ms": seconds * 1e3, "us_per_chunk": seconds * 1e6 / chunks}
            results[workload_name][name] = row
            print(f"{workload_name:9} {name:13} {row['us_per_chunk']:7.2f} µs/chunk")
    environment = describe_device("cpu") | {
        "pydantic": version("pydantic"),
        "openai": version("openai"),
    }
    payload = {
        "benchmark": "openai-serialize",
        "environment": environment,
        "chunks": chunks,
        "repeats": repeats,
        "same_content": same,
        "results": results,
    }
    print(f"same content: {same}; wrote {save('openai-serialize', payload, args.out)}")


if __name__ == "__main__":
    main()
