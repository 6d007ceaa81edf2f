"""Flags built from the options' dataclass fields, the one dtype vocabulary, and errors spelled in flags.

An option is defined once, as a field of ``SamplingParams``, ``GenerationConfig``, ``TrainConfig`` or
``ServerConfig`` (see ``forge.config``). :func:`field_option` makes its flag: ``--`` and the field's name
with dashes, the click range of its bound (or its choices), its help text, and its default unless a
command has its own (``forge chat`` answers at ``temperature=0.2``). A ``ForgeError`` about a field is
printed with that field spelled as the running command's flag.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from forge.config import DTYPE_ALIASES, INFERENCE_DTYPES, Bound, Spec, specs
from forge.core.device import DEVICES
from forge.core.quantize import SCHEMES
from forge.errors import ConfigError, ForgeError

__all__ = [
    "COMPILE_OPTION",
    "DEVICE_OPTION",
    "INFERENCE_DTYPE_OPTION",
    "NO_LIMIT",
    "POSITIVE_FLOAT",
    "POSITIVE_INT",
    "QUANTIZE_OPTION",
    "AliasedOption",
    "CommandError",
    "DtypeChoice",
    "ForgeCommand",
    "ForgeGroup",
    "click_type",
    "dtype_option",
    "field_option",
    "field_options",
    "flag_name",
]

F = TypeVar("F", bound=Callable[..., Any])

#: Ranges of CLI-only numbers (a demo's seconds, a port): options of the dataclasses bring their own.
POSITIVE_INT = click.IntRange(min=1)
POSITIVE_FLOAT = click.FloatRange(min=0, min_open=True)
DEVICE_OPTION = click.option(
    "--device", type=click.Choice(DEVICES), default="auto", show_default=True, help="Where to run."
)


def flag_name(field: str) -> str:
    """The flag of a field: ``max_tokens`` -> ``--max-tokens``."""
    return "--" + field.replace("_", "-")


class AliasedOption(click.Option):
    """An option that also answers to old spellings (``aliases``), kept for compatibility and left out of --help."""

    def __init__(self, param_decls: Sequence[str], *, aliases: Sequence[str] = (), **attrs: Any) -> None:
        super().__init__([*param_decls, *aliases], **attrs)
        self.aliases = tuple(aliases)

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        every = self.opts
        self.opts = [o for o in every if o not in self.aliases]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = every


class DtypeChoice(click.Choice):
    """A choice of dtypes in the one vocabulary (``forge.config.DTYPES``); the aliases (bf16, fp32, f16) map to it."""

    def __init__(self, choices: Sequence[str]) -> None:
        super().__init__(list(choices))

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return super().convert(DTYPE_ALIASES.get(value, value) if isinstance(value, str) else value, param, ctx)


def dtype_option(name: str, choices: Sequence[str], default: str, help: str) -> Callable[[F], F]:
    """A dtype flag: its choices in the one vocabulary, with the aliases accepted and said so in --help."""
    aliases = sorted(a for a, canonical in DTYPE_ALIASES.items() if canonical in choices)
    also = f" ({', '.join(aliases)} are accepted too.)" if aliases else ""
    return click.option(name, type=DtypeChoice(choices), default=default, show_default=True, help=help + also)


#: `--dtype` of the inference commands (chat, serve, rag ask).
INFERENCE_DTYPE_OPTION = dtype_option(
    "--dtype", INFERENCE_DTYPES, "auto", "Weights for inference; auto is bfloat16 where the hardware runs it natively."
)

#: `--quantize` of the inference commands (chat, generate, serve): ``Forge(quantize=...)``'s schemes.
QUANTIZE_OPTION = click.option(
    "--quantize",
    type=click.Choice(SCHEMES),
    default=None,
    help="Keep the linear layers' weights quantized (round-to-nearest): int8 per channel, int4 in groups of 32. "
    "Embeddings and the output head stay float.",
)

#: `--compile` of chat and generate: ``Forge(compile=...)``.
COMPILE_OPTION = click.option(
    "--compile/--no-compile",
    default=False,
    show_default=True,
    help="Compile the decode step (torch.compile): faster tokens after a one-time compile (tens of seconds on a "
    "CPU, cached on disk for the next run).",
)

#: `--draft` of chat, generate and serve: ``Forge(draft=...)``; implies ``--speculate draft``.
DRAFT_OPTION = click.option(
    "--draft",
    default=None,
    metavar="MODEL",
    help="Speculative decoding with this smaller model (same tokenizer) proposing tokens; implies --speculate draft.",
)


def speculate_with(draft: str | None, speculate: str) -> str:
    """``--speculate``'s value once ``--draft`` is known: a draft model turns speculation on unless asked off."""
    if draft is None:
        if speculate == "draft":
            raise ConfigError("--speculate draft needs a draft model: add --draft MODEL (same tokenizer)")
        return speculate
    return "draft" if speculate in ("off", "draft") else speculate


#: Ends past this (a seed's 64 bits) are no limit a user meets: --help shows none, and the dataclass still checks.
NO_LIMIT = 2**53


def click_type(bound: Bound) -> click.ParamType:
    """The click range of a bound: ``Bound(integer=True, ge=1)`` -> ``IntRange(min=1)``."""
    (low, low_open), (high, high_open) = bound.low, bound.high
    ends: dict[str, Any] = {}
    if low > -NO_LIMIT:
        ends.update(min=low, min_open=low_open)
    if high < NO_LIMIT:
        ends.update(max=high, max_open=high_open)
    if not ends:
        return click.INT if bound.integer else click.FLOAT
    if bound.integer:
        return click.IntRange(**{k: int(v) if k in ("min", "max") else v for k, v in ends.items()})
    return click.FloatRange(**ends)


_FIELD_DEFAULT: Any = object()


def field_option(
    owner: type,
    field: str,
    *,
    default: Any = _FIELD_DEFAULT,
    help: str | None = None,
    aliases: Sequence[str] = (),
    flag: str | None = None,
    **attrs: Any,
) -> Callable[[F], F]:
    """The flag of ``owner.field``: its name, type, range or choices, help and default come from the field.

    ``default`` and ``help`` replace the field's where a command needs its own; ``aliases`` are old spellings
    still accepted; ``flag`` names a flag that reads better than the field's (``--cors-origin``, repeatable).
    """
    spec: Spec = specs(owner)[field]
    if default is _FIELD_DEFAULT:
        default = next(f.default for f in dataclasses.fields(owner) if f.name == field)
        default = None if default is dataclasses.MISSING else default
    name = flag or flag_name(field)
    decls: list[str] = [name]
    kind: dict[str, Any] = {}
    if spec.bound is not None:
        kind["type"] = click_type(spec.bound)
    elif spec.choices:
        kind["type"] = DtypeChoice(spec.choices) if spec.aliases else click.Choice(spec.choices)
    elif _is_bool(owner, field):
        kind["is_flag"] = True
        if default is not False:  # None or True: both spellings, so either can be asked for
            decls = [f"{name}/--no-{name[2:]}"]
    text = help if help is not None else spec.doc
    if spec.aliases:
        text += f" ({', '.join(sorted(spec.aliases))} are accepted too.)"
    return click.option(
        *decls,
        field,
        cls=AliasedOption,
        aliases=aliases,
        default=default,
        show_default=default is not None and default != (),
        help=text,
        **kind,
        **attrs,
    )


def field_options(owner: type, fields: Sequence[str], **overrides: dict[str, Any]) -> Callable[[F], F]:
    """The flags of several fields of ``owner``, in this order; ``overrides[field]`` are field_option's keywords."""

    def apply(f: F) -> F:
        for field in reversed(fields):  # click lists options in the order the decorators are written
            f = field_option(owner, field, **overrides.get(field, {}))(f)
        return f

    return apply


def _is_bool(owner: type, field: str) -> bool:
    annotation = next(f.type for f in dataclasses.fields(owner) if f.name == field)
    return str(annotation).startswith("bool")


class CommandError(click.ClickException):
    """A ForgeError out of a command, its message spelled in the command's flags, with the error's exit code."""

    def __init__(self, error: ForgeError, flags: dict[str, str]) -> None:
        super().__init__(error.render(flags))
        self.exit_code = error.exit_code
        self.error = error


class ForgeCommand(click.Command):
    """A command that prints a ForgeError about a field with its flag: ``context=4096`` -> ``--context 4096``."""

    def flags(self) -> dict[str, str]:
        """Python name -> flag, from the command's own options (one mapping, derived from their definitions)."""
        return {p.name: p.opts[0] for p in self.params if isinstance(p, click.Option) and p.name}

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ForgeError as e:
            raise CommandError(e, self.flags()) from e


class ForgeGroup(click.Group):
    """A group whose commands (and sub-groups) are ForgeCommands."""

    command_class = ForgeCommand
    group_class = type
