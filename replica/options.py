"""One declaration per option: an engine option is a field of ``EngineConfig`` whose default
:func:`option` wraps, with its help text (and the name users write, where that differs from the
field's). Everything users set is derived from those declarations:

- the command-line flags of ``vattn generate`` (replica.cli) and ``vattn serve``
  (cluster.serve_cli): :func:`add_option_arguments`, read back by :func:`option_values`;
- the Serve application's args (cluster.app.AppOptions, a pydantic model built from
  :func:`declared_options`).

Adding a knob is one field: ``my_knob: int = option(4, "what it does")``. A light module (no
torch): the CLIs and the app's options import it.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

#: The metadata key under which a field's :class:`OptionInfo` is kept.
OPTION = "vattn.option"


@dataclass(frozen=True)
class OptionInfo:
    """What a declaration says about an option besides its type and default."""

    help: str
    #: What users write (app arg ``name``, flag ``--name``); None: the field's name.
    name: str | None = None
    #: The values allowed (the CLI lists them; the declaration's own check refuses others).
    choices: tuple[str, ...] | None = None


def option(
    default: Any, help: str, *, name: str | None = None, choices: Sequence[str] | None = None
) -> Any:
    """A dataclass field that users may set: ``default``, described by ``help`` (a phrase; the CLI
    appends the default unless it is None, which ``help`` then explains)."""
    info = OptionInfo(help, name, tuple(choices) if choices is not None else None)
    return dataclasses.field(default=default, metadata={OPTION: info})


@dataclass(frozen=True)
class DeclaredOption:
    """One option as the CLIs and the app's args see it."""

    field: str  # the declaration's field (EngineConfig.attention)
    name: str  # what users write: app arg ``backend``, flag ``--backend``
    annotation: Any  # the field's type, evaluated
    default: Any
    help: str
    choices: tuple[str, ...] | None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def declared_options(declaration: type) -> tuple[DeclaredOption, ...]:
    """The options of a dataclass ``declaration`` (its fields made with :func:`option`), in field
    order."""
    hints = typing.get_type_hints(declaration)
    return tuple(
        DeclaredOption(
            field.name,
            info.name or field.name,
            hints[field.name],
            field.default,
            info.help,
            info.choices,
        )
        for field in dataclasses.fields(declaration)
        if (info := field.metadata.get(OPTION)) is not None
    )


def check_choices(config: Any) -> None:
    """Raises ValueError for an option of ``config`` (a declaration's instance) set to a value
    outside its declared choices."""
    for spec in declared_options(type(config)):
        value = getattr(config, spec.field)
        if spec.choices is not None and value not in spec.choices:
            raise ValueError(
                f"{type(config).__name__}.{spec.field} must be one of {', '.join(spec.choices)}, "
                f"got {value!r}"
            )


def add_option_arguments(parser: argparse.ArgumentParser, declaration: type) -> None:
    """One flag per option of ``declaration``: ``--name VALUE``, or for a boolean ``--name``
    (default off) / ``--no-name`` (default on). Each flag's dest is the option's name."""
    for spec in declared_options(declaration):
        if spec.annotation is bool:
            on = bool(spec.default)
            parser.add_argument(
                f"--no-{spec.flag[2:]}" if on else spec.flag,
                dest=spec.name,
                action="store_false" if on else "store_true",
                default=on,
                help=spec.help.replace("%", "%%")
                + (" (on by default; this turns it off)" if on else " (off by default)"),
            )
            continue
        default = "" if spec.default is None else f" (default: {spec.default})"
        parser.add_argument(
            spec.flag,
            dest=spec.name,
            type=_parser_type(spec.annotation),
            default=spec.default,
            choices=spec.choices,
            help=spec.help.replace("%", "%%") + default,  # argparse formats help with %
        )


def _parser_type(annotation: Any) -> type:
    """``int`` for ``int`` and ``int | None`` (None is the default, never typed in)."""
    kinds = [kind for kind in typing.get_args(annotation) if kind is not type(None)]
    kind = kinds[0] if len(kinds) == 1 else annotation
    if kind not in (str, int, float):
        raise TypeError(f"no command-line form for an option of type {annotation!r}")
    return kind  # type: ignore[no-any-return]


def option_values(source: Any, declaration: type) -> dict[str, Any]:
    """``declaration``'s options read from ``source`` (parsed flags, or the app's options) by the
    names users write, keyed by field: ``declaration(**option_values(args, declaration))``."""
    return {spec.field: getattr(source, spec.name) for spec in declared_options(declaration)}
