"""Each option is defined once, in its dataclass; the CLI, the HTTP schema and the errors agree with it.

STYLE.md, habit 10: names and bounds alike. The CLI builds its flags from the fields (forge.cli.options);
these tests check that what it built, and what the server's schema and ``serve()`` declare, still match.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path
from typing import Any

import click
import pytest
import torch

import forge.errors as errors_module
from forge import models
from forge.app import Forge
from forge.cli import cli
from forge.cli.options import NO_LIMIT, ForgeCommand, click_type, flag_name
from forge.config import DTYPE_ALIASES, DTYPES, INFERENCE_DTYPES, Bound, specs
from forge.core.quantize import SCHEMES
from forge.core.sampling import SamplingParams
from forge.errors import ConfigError, DeviceError, ForgeError
from forge.generator import GenerationConfig
from forge.rag.retrieval import Rag
from forge.server import serve
from forge.server.config import ServerConfig
from forge.server.schemas import HTTP_RANGES, ChatRequest, CompletionRequest, http_bound
from forge.trainer import TrainConfig

SRC = Path(__file__).resolve().parents[1] / "src" / "forge"

#: Which dataclass defines the options of each command (by the command's path under `forge`).
SURFACES: dict[tuple[str, ...], tuple[type, ...]] = {
    ("train",): (TrainConfig,),
    ("demo",): (TrainConfig,),
    ("generate",): (GenerationConfig,),
    ("chat",): (GenerationConfig,),
    ("serve",): (ServerConfig,),
    ("rag", "ask"): (ServerConfig, GenerationConfig),
}
#: Defaults a command sets for itself, on purpose (each says why in its command).
OWN_DEFAULTS = {
    ("chat", "max_tokens"): 512,
    ("chat", "temperature"): 0.2,
    ("chat", "top_p"): 0.9,
    ("serve", "max_batch"): None,  # sized to the memory there is
    ("rag", "ask", "max_tokens"): 256,
    ("demo", "steps"): None,  # a time budget instead
    ("train", "optimizer"): None,  # chosen by the run: muon for a new model, adamw to fine-tune
}
#: Flags that read better than the field's name.
OWN_FLAGS = {"cors_origins": "--cors-origin"}  # one origin per flag, repeatable


def _command(path: tuple[str, ...]) -> click.Command:
    command: click.Command = cli
    for name in path:
        assert isinstance(command, click.Group)
        command = command.commands[name]
    return command


def _options(path: tuple[str, ...]) -> list[click.Option]:
    return [p for p in _command(path).params if isinstance(p, click.Option)]


def _field_options() -> list[tuple[tuple[str, ...], click.Option, type]]:
    found = []
    for path, owners in SURFACES.items():
        for option in _options(path):
            owner = next((o for o in owners if option.name in specs(o)), None)
            if owner is not None:
                found.append((path, option, owner))
    return found


FIELD_OPTIONS = _field_options()
IDS = ["/".join(path) + ":" + str(option.name) for path, option, _ in FIELD_OPTIONS]


def _default(owner: type, name: str) -> Any:
    field = next(f for f in dataclasses.fields(owner) if f.name == name)
    return field.default_factory() if field.default is dataclasses.MISSING else field.default  # type: ignore[misc]


def _bound_of(kind: click.ParamType) -> Bound | None:
    """A click range as a Bound (None for a type without one)."""
    if not isinstance(kind, click.IntRange | click.FloatRange):
        return None
    low = {"ge": kind.min} if not kind.min_open else {"gt": kind.min}
    high = {"le": kind.max} if not kind.max_open else {"lt": kind.max}
    return Bound(integer=isinstance(kind, click.IntRange), **low, **high)  # type: ignore[arg-type]


# -- the CLI ---------------------------------------------------------------------------------------------


def test_every_surface_has_its_options() -> None:
    """Not vacuous: the flags that most need to agree are found as fields."""
    names = {(path, option.name) for path, option, _ in FIELD_OPTIONS}
    for expected in [
        (("train",), "steps"),
        (("train",), "lora_rank"),
        (("train",), "precision"),
        (("generate",), "temperature"),
        (("chat",), "top_p"),
        (("serve",), "rag_k"),
        (("serve",), "header_timeout"),
        (("rag", "ask"), "rag_k"),
    ]:
        assert expected in names


@pytest.mark.parametrize(("path", "option", "owner"), FIELD_OPTIONS, ids=IDS)
def test_a_flag_has_its_field_s_name(path: tuple[str, ...], option: click.Option, owner: type) -> None:
    assert option.name is not None
    assert option.opts[0] == OWN_FLAGS.get(option.name, flag_name(option.name))


@pytest.mark.parametrize(("path", "option", "owner"), FIELD_OPTIONS, ids=IDS)
def test_a_flag_has_its_field_s_bounds(path: tuple[str, ...], option: click.Option, owner: type) -> None:
    spec = specs(owner)[str(option.name)]
    if spec.bound is not None:
        flag = _bound_of(option.type)
        if flag is None:  # no practical end: only a seed's 64 bits, which the dataclass still checks
            (low, _), (high, _) = spec.bound.low, spec.bound.high
            assert low <= -NO_LIMIT and high >= NO_LIMIT and option.type in (click.INT, click.FLOAT)
            return
        assert flag.within(dataclasses.replace(spec.bound, optional=False)), (flag, spec.bound)
        assert flag == dataclasses.replace(spec.bound, optional=False)  # not narrower either: the same range
    elif spec.choices:
        assert isinstance(option.type, click.Choice)
        assert tuple(option.type.choices) == spec.choices


@pytest.mark.parametrize(("path", "option", "owner"), FIELD_OPTIONS, ids=IDS)
def test_a_flag_has_its_field_s_default(path: tuple[str, ...], option: click.Option, owner: type) -> None:
    name = str(option.name)
    expected = OWN_DEFAULTS.get((*path, name), _default(owner, name))
    assert option.default == expected or (option.multiple and tuple(option.default or ()) == tuple(expected))


def test_the_flags_are_checked_by_click_with_the_field_s_bounds() -> None:
    assert click_type(Bound(integer=True, ge=1)).to_info_dict()["min"] == 1
    with pytest.raises(click.BadParameter):
        click_type(specs(SamplingParams)["top_p"].bound).convert(0.0, None, None)  # type: ignore[arg-type]
    assert click_type(specs(SamplingParams)["top_p"].bound).convert(1.0, None, None) == 1.0  # type: ignore[arg-type]


def test_one_name_per_concept_with_the_old_flags_as_hidden_aliases() -> None:
    renamed = {
        ("train",): {"--model": "--from", "--lora-rank": "--lora"},
        ("rag", "add"): {"--chunk-overlap": "--overlap"},
        ("rag", "ask"): {"--rag-k": "--k", "--rag-mode": "--mode"},
        ("serve",): {"--db": "--rag"},
    }
    for path, flags in renamed.items():
        command = _command(path)
        with click.Context(command) as ctx:
            shown = command.get_help(ctx)
        for new, old in flags.items():
            option = next(o for o in _options(path) if new in o.opts)
            assert old in option.opts  # still accepted
            assert re.search(rf"{re.escape(new)}\b", shown) and not re.search(rf"{re.escape(old)}\b(?!-)", shown)
    assert "db" in {o.name for o in _options(("rag", "ask"))} and "db" in {o.name for o in _options(("serve",))}


def test_rag_add_defaults_are_rag_s() -> None:
    signature = inspect.signature(Rag.__init__).parameters
    for option in _options(("rag", "add")):
        if option.name in signature:
            assert option.default == signature[option.name].default


def test_serve_s_keywords_have_server_config_s_defaults() -> None:
    fields = {f.name for f in dataclasses.fields(ServerConfig)}
    parameters = inspect.signature(serve).parameters
    shared = [name for name in parameters if name in fields]
    assert shared or any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    for name in shared:
        assert parameters[name].default == _default(ServerConfig, name), name


# -- sampling: defined once ------------------------------------------------------------------------------


def test_generation_config_shares_the_sampling_options() -> None:
    sampling, generation = specs(SamplingParams), specs(GenerationConfig)
    assert set(sampling) <= set(generation)
    for name, spec in sampling.items():
        assert generation[name] == spec, name


@pytest.mark.parametrize(
    ("name", "value"),
    [("temperature", -0.5), ("top_p", 0.0), ("top_k", 0), ("seed", 2**64), ("logprobs", 21), ("max_tokens", 0)],
)
def test_generation_config_errors_carry_the_field(name: str, value: object) -> None:
    with pytest.raises(ConfigError) as caught:
        GenerationConfig(**{name: value})
    assert caught.value.field == name and f"GenerationConfig.{name} = {value!r}" in caught.value.message


# -- the HTTP schema -------------------------------------------------------------------------------------


def _schema_bound(model: Any, name: str) -> Bound:
    """The range pydantic checks for a request field (its type is pydantic's to check)."""
    metadata = model.model_fields[name].metadata
    return Bound(**{k: getattr(m, k) for m in metadata for k in ("ge", "gt", "le", "lt") if hasattr(m, k)})


#: Request field -> GenerationConfig field.
HTTP_FIELDS = {name: name for name in specs(SamplingParams)} | {
    "max_tokens": "max_tokens",
    "seed": "seed",
    "max_completion_tokens": "max_tokens",
    "top_logprobs": "logprobs",
}


@pytest.mark.parametrize(("request_field", "option"), sorted(HTTP_FIELDS.items()))
def test_the_schema_range_is_the_option_s_or_openai_s_inside_it(request_field: str, option: str) -> None:
    model = ChatRequest
    schema = _schema_bound(model, request_field)
    own = dataclasses.replace(specs(GenerationConfig)[option].bound, optional=False)  # type: ignore[arg-type]
    assert (schema.low, schema.high) == (http_bound(option).low, http_bound(option).high)
    if option == "top_p":  # OpenAI's 0 means greedy, and the server maps it so: the rest lies inside
        assert schema.low == (0, False)
        schema = dataclasses.replace(schema, ge=None, gt=0)
    assert dataclasses.replace(schema, integer=own.integer).within(own), (request_field, schema, own)
    if option not in HTTP_RANGES:
        assert (schema.low, schema.high) == (own.low, own.high)


def test_temperature_follows_openai_inside_the_option_s_range() -> None:
    schema, own = _schema_bound(ChatRequest, "temperature"), specs(GenerationConfig)["temperature"].bound
    assert schema.high == (2, False) and own is not None and own.high[0] == float("inf")
    assert schema.within(dataclasses.replace(own, optional=False))


def test_completions_share_the_ranges() -> None:
    for name in ("temperature", "top_p", "max_tokens", "seed", "logprobs"):
        chat = "top_logprobs" if name == "logprobs" else name
        assert _schema_bound(CompletionRequest, name).low == _schema_bound(ChatRequest, chat).low
        assert _schema_bound(CompletionRequest, name).high == _schema_bound(ChatRequest, chat).high


# -- one dtype vocabulary --------------------------------------------------------------------------------


def test_every_dtype_flag_speaks_the_one_vocabulary() -> None:
    found = 0
    for path in [("train",), ("chat",), ("serve",), ("rag", "ask"), ("export",)]:
        for option in _options(path):
            if option.name in ("dtype", "precision"):
                found += 1
                assert isinstance(option.type, click.Choice) and set(option.type.choices) <= set(DTYPES)
                if "bfloat16" in option.type.choices:
                    assert option.type.convert("bf16", option, None) == "bfloat16"
    assert found == 5


def test_the_python_api_speaks_it_too() -> None:
    assert set(INFERENCE_DTYPES) <= set(DTYPES)
    assert all(set(d) <= set(DTYPES) for d in models.EXPORT_FORMATS.values())
    assert set(specs(TrainConfig)["precision"].choices) <= set(DTYPES)
    assert TrainConfig(precision="bf16").precision == "bfloat16"  # the old spelling, still accepted
    assert TrainConfig(precision="fp32").precision == "float32"
    assert Forge("tiny", device="cpu", dtype="bf16").dtype == torch.bfloat16  # type: ignore[arg-type]
    assert set(DTYPE_ALIASES.values()) <= set(DTYPES)
    with pytest.raises(ConfigError, match="precision"):
        TrainConfig(precision="float16")  # type: ignore[arg-type]


def test_quantize_is_one_option_with_forge_s_schemes() -> None:
    """`--quantize` of chat, generate and serve: Forge(quantize=...)'s schemes, off by default."""
    for path in [("chat",), ("generate",), ("serve",)]:
        option = next(o for o in _options(path) if o.name == "quantize")
        assert option.opts == ["--quantize"] and option.default is None
        assert isinstance(option.type, click.Choice) and tuple(option.type.choices) == SCHEMES
    assert inspect.signature(Forge.__init__).parameters["quantize"].default is None
    with pytest.raises(ConfigError, match="int8, int4"):
        Forge("tiny", quantize="int3")  # type: ignore[arg-type]


# -- errors ----------------------------------------------------------------------------------------------


def _forge_errors() -> list[type[ForgeError]]:
    return [
        c
        for c in vars(errors_module).values()
        if isinstance(c, type) and issubclass(c, ForgeError) and c.__module__ == errors_module.__name__
    ]


def test_exit_codes_are_distinct() -> None:
    """A class with its own exit code has one no other has; one without is a kind of its parent."""
    own = {c: c.__dict__["exit_code"] for c in _forge_errors() if "exit_code" in c.__dict__}
    assert len(own) >= 13
    assert len(set(own.values())) == len(own), own
    for c in _forge_errors():
        if c not in own:
            assert c.exit_code == next(p for p in c.__mro__ if p in own).exit_code


def test_every_error_is_in_the_tree_with_its_exit_code_and_status() -> None:
    tree = errors_module.__doc__ or ""
    for c in _forge_errors():
        line = next((line for line in tree.splitlines() if re.match(rf"^[\s│├└─]*{c.__name__}\b", line)), None)
        assert line is not None, f"{c.__name__} is not in the tree"
        if "exit_code" in c.__dict__:
            assert f"exit {c.exit_code}," in line and "HTTP" in line, line


def test_every_error_of_the_agent_middleware_and_server_is_in_errors_py() -> None:
    import forge.agent as agent
    import forge.middleware as middleware
    import forge.server.errors as server_errors

    assert agent.AgentError is errors_module.AgentError and agent.ToolError is errors_module.ToolError
    assert middleware.RateLimitError is errors_module.RateLimitError
    assert server_errors.ApiError is errors_module.ApiError


def test_the_cli_spells_a_field_as_its_flag() -> None:
    train = _command(("train",))
    assert isinstance(train, ForgeCommand)
    flags = train.flags()
    assert flags["lora_rank"] == "--lora-rank" and flags["context"] == "--context" and flags["model"] == "--model"
    error = ConfigError(
        "context=4096 is longer than the model's context of 256; use context=256 or less", field="context"
    )
    assert error.render(flags) == "--context 4096 is longer than the model's context of 256; use --context 256 or less"
    assert DeviceError("use device='cpu'", field="device").render(flags) == "use --device cpu"
    assert (
        ConfigError.for_field("TrainConfig", "lr", 0, "must be > 0").render(flags) == "--lr 0 is invalid: must be > 0"
    )
    assert error.render({}) == error.message  # a surface that doesn't know the field: as it is


#: Messages that name a flag of ours on purpose, and why.
FLAG_MESSAGES = {
    "core/kv_cache.py",  # the KV cache plan is `forge serve`'s: its advice is in serve's flags
    "server/app.py",  # tells the operator how to start the server (forge serve MODEL --db DB)
}


def _raised_texts(path: Path) -> list[str]:
    """The messages ``raise SomeError(...)`` builds in a module, as source text."""
    texts = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            texts += [ast.unparse(arg) for arg in node.exc.args]
    return texts


def test_library_errors_name_the_python_field_not_a_flag() -> None:
    flags = {o for command in [*cli.commands.values(), *_command(("rag",)).commands.values()] for p in command.params
             if isinstance(p, click.Option) for o in p.opts if o.startswith("--")}  # fmt: skip
    flags -= {"--help"}
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        where = path.relative_to(SRC).as_posix()
        if where.startswith("cli/") or where in FLAG_MESSAGES:
            continue
        for text in _raised_texts(path):
            text = re.sub(r"`[^`]*`", "", text)  # a quoted command line (`forge train --out`) is an example to run
            offenders += [f"{where}: {flag}" for flag in re.findall(r"--[a-z][a-z-]*", text) if flag in flags]
    assert offenders == []
