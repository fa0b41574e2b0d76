"""A reply streamed as server-sent events: the framing of every event."""

from __future__ import annotations

from cluster.openai.responses import Body


def sse_event(body: Body) -> str:
    """One server-sent event carrying a JSON body."""
    return f"data: {body.to_json()}\n\n"
