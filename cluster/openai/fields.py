"""The field policy: every field of a request is honoured, refused or ignored, each list in one
place.

* honoured: the fields the request models declare (``cluster.openai.requests``: OpenAI's, plus
  vLLM's ``top_k``, ``min_p``, ``repetition_penalty``, ``stop_token_ids`` and ``ignore_eos``),
  less those of ``UNSUPPORTED``;
* ``UNSUPPORTED``: OpenAI fields vattn does not implement yet. They are accepted only at the value
  that asks for nothing (e.g. ``presence_penalty`` 0, ``n`` 1) or null; any other value is a 400
  that names the field and says it is not supported yet;
* ``IGNORED``: metadata that changes nothing in what is generated (``user``, ``metadata``,
  ``store``, ...), accepted and dropped;
* any other field is a 400 naming it (an unknown field).

Text that is not valid Unicode (a lone UTF-16 surrogate such as ``"\\ud800"``, which JSON can
escape) is a 400 naming the field rather than reaching the tokenizer (``check_text``).
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError

#: Fields of OpenAI's API that change nothing in what vattn generates: accepted and ignored, by
#: where they appear. docs/api.md lists the same.
IGNORED: dict[str, frozenset[str]] = {
    "completions": frozenset({"user"}),
    "chat": frozenset(
        {
            "user",
            "metadata",
            "store",
            "service_tier",
            "safety_identifier",
            "prompt_cache_key",
            "prompt_cache_retention",
            "prompt_cache_options",
            # Calls are as many as the model makes (auto) or asks the schema (required).
            "parallel_tool_calls",
        }
    ),
    "message": frozenset({"name"}),
    "stream_options": frozenset(),
    "tool": frozenset(),
    "function": frozenset(),
    "tool_choice": frozenset(),
    "response_format": frozenset(),
    "json_schema": frozenset(),
}

#: OpenAI fields vattn does not implement yet -> the values that ask for nothing (null is always
#: one). At those values a field is accepted; at any other it is refused with a 400 naming it.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    # completions and chat
    "include_obfuscation": (False,),  # in stream_options: vattn sends no obfuscation field
    # completions
    "echo": (False,),  # echo's prompt logprobs are not computed
    "suffix": ("",),
    # chat
    "functions": ([],),
    "function_call": ("none", "auto"),
    "modalities": (["text"],),
    "audio": (),
    "prediction": (),
    "reasoning_effort": (),
    "verbosity": (),
    "moderation": (),
    "web_search_options": (),
    # chat messages
    "refusal": (),
}


def field_error(field: str, message: str, kind: str = "field_error") -> PydanticCustomError:
    """A validation error about ``field``, a path relative to where it is raised (a model
    validator: the model; a field validator: the field), with ``message`` as it is."""
    return PydanticCustomError(kind, message, {"field": field})


def _is_neutral(value: Any, neutrals: tuple[Any, ...]) -> bool:
    if value is None:
        return True
    return any(value == n and isinstance(value, bool) == isinstance(n, bool) for n in neutrals)


def unsupported_message(field: str) -> str:
    neutrals = UNSUPPORTED[field]
    accepted = " or ".join(f"{field} = {json.dumps(v)}" for v in neutrals)
    return f"{field} is not supported yet: only {accepted + ' or ' if accepted else ''}null works"


def check_text(value: str) -> str:
    """Refuses text that is not valid Unicode (a field validator's: the error's place is the
    field's): the tokenizer cannot encode a lone surrogate."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        point = f"U+{ord(value[error.start]):04X}"
        message = f"contains a lone UTF-16 surrogate ({point}), which is not valid Unicode text"
        raise PydanticCustomError("invalid_unicode", message) from None
    return value


class Strict(BaseModel):
    """A request object: unknown fields are refused, ``IGNORED`` ones dropped, ``UNSUPPORTED``
    ones refused unless neutral."""

    model_config = ConfigDict(extra="forbid")
    scope: ClassVar[str]

    @model_validator(mode="before")
    @classmethod
    def _drop_ignored(cls, data: Any) -> Any:
        if isinstance(data, dict):
            ignored = IGNORED[cls.scope]
            return {k: v for k, v in data.items() if k not in ignored}
        return data

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> Strict:
        for name in type(self).model_fields:
            if name in UNSUPPORTED and not _is_neutral(getattr(self, name), UNSUPPORTED[name]):
                raise field_error(name, unsupported_message(name), "unsupported_field")
        return self
