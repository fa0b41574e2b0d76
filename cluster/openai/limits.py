"""How big a request may be before anything reads it: a body too big for any prompt that fits the
context is a 413 (``cluster.request_guards.BodyLimit``), a prompt with more characters than the
context could hold is a 400 before it is tokenized."""

from __future__ import annotations

from dataclasses import dataclass

#: The most UTF-8 bytes one character of a request body can take as JSON: a control character
#: escaped as ``\u0000`` is 6 bytes for 1 byte of text.
JSON_BYTES_PER_TEXT_BYTE = 6
#: What a body may hold besides its prompt (other fields, message framing, whitespace).
BODY_SLACK_BYTES = 1 << 20


@dataclass(frozen=True)
class RequestLimits:
    """How big a request can be and still fit the context: no token of the model spans more than
    ``max_token_bytes`` bytes of text (so more characters than ``context_tokens`` tokens of that
    size cannot fit), and no body needs more than ``JSON_BYTES_PER_TEXT_BYTE`` bytes of JSON per
    byte of that text, plus some slack for the other fields."""

    context_tokens: int
    max_token_bytes: int

    @property
    def max_prompt_chars(self) -> int:
        return self.context_tokens * self.max_token_bytes

    @property
    def max_body_bytes(self) -> int:
        return JSON_BYTES_PER_TEXT_BYTE * self.max_prompt_chars + BODY_SLACK_BYTES

    def prompt_too_long(self, chars: int) -> str | None:
        """Why a prompt of ``chars`` characters cannot fit, or None when it may."""
        if chars <= self.max_prompt_chars:
            return None
        return (
            f"the prompt has {chars} characters, more than {self.max_prompt_chars}: it exceeds "
            f"the context limit of {self.context_tokens} tokens (no token of this model spans "
            f"more than {self.max_token_bytes} bytes)"
        )

    def body_too_big(self) -> str:
        return (
            f"the request body has more than {self.max_body_bytes} bytes: its prompt cannot fit "
            f"the context limit of {self.context_tokens} tokens"
        )
