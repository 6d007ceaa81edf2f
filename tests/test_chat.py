"""Chat: message checks, template rendering, ``app.chat`` / ``app.chat_stream`` and stop tokens.

The model is the bigram checkpoint of conftest ("a" -> "bcde..."), given a
chat template that puts the last message's content last, so every reply is
known in advance. Rendering real templates against transformers is in
test_pretrained.py.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

from forge.app import Forge
from forge.chat import PLAIN_TEMPLATE, TemplateLimits, check_messages, render_chat
from forge.errors import ChatTemplateError, ConfigError
from forge.events import Event
from forge.generator import GenerationConfig, Generator
from forge.middleware import Context, Next
from forge.tokenizer import Tokenizer

#: The prompt is the last message's content: the bigram model continues it.
LAST = "{{ messages[-1]['content'] }}"


@pytest.fixture
def app(bigram_dir: Path) -> Forge:
    app = Forge.load(bigram_dir, defaults=GenerationConfig(temperature=0, max_tokens=4))
    assert app.tokenizer is not None
    app.tokenizer.chat_template = LAST
    return app


def chat_stream(app: Forge, messages: Any, **options: Any) -> list[str]:
    async def collect() -> list[str]:
        return [piece async for piece in app.chat_stream(messages, **options)]

    return asyncio.run(collect())


# -- messages ------------------------------------------------------------------------------
def test_a_string_is_one_user_message() -> None:
    assert check_messages("hi") == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "non-empty list"),
        (None, "non-empty list"),
        ([{"role": "user"}], r"messages\[0\].*'role' and 'content'"),
        ([{"role": "wizard", "content": "x"}], "role 'wizard'.*system, user, assistant, tool"),
        ([{"role": "user", "content": 3}], r"messages\[0\]\['content'\] must be a string, got int"),
        (["hello"], r"messages\[0\]"),
    ],
)
def test_bad_messages_are_config_errors(messages: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        check_messages(messages)


# -- rendering ----------------------------------------------------------------------------------
def test_the_plain_template_for_models_without_one() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    assert render_chat(None, messages) == "System: Be brief.\nUser: Hi\nAssistant: Hello.\nUser: Bye\nAssistant:"
    assert render_chat(PLAIN_TEMPLATE, messages, add_generation_prompt=False).endswith("User: Bye\n")


def test_templates_see_special_tokens_and_trim_blocks() -> None:
    template = "{{ bos_token }}{% for m in messages %}\n[{{ m.role }}]{{ m.content | tojson }}{% endfor %}"
    text = render_chat(template, [{"role": "user", "content": 'é"x'}], special_tokens={"bos_token": "<s>"})
    assert text == '<s>[user]"é\\"x"'  # trim_blocks ate the newline; tojson keeps unicode as is


def test_raise_exception_in_a_template_is_a_config_error() -> None:
    template = "{% if messages[0].role != 'user' %}{{ raise_exception('must start with a user') }}{% endif %}"
    with pytest.raises(ConfigError, match="must start with a user"):
        render_chat(template, [{"role": "assistant", "content": "x"}])


def test_an_invalid_template_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not valid Jinja"):
        render_chat("{% for %}", [{"role": "user", "content": "x"}])


def test_templates_are_sandboxed() -> None:
    with pytest.raises(ConfigError):
        render_chat("{{ messages.__class__.__mro__[1].__subclasses__() }}", [{"role": "user", "content": "x"}])


# -- untrusted templates: bounded work, bounded memory -------------------------------------------------
HI = [{"role": "user", "content": "hi"}]
DOUBLING = "{% set ns = namespace(s='a') %}{% for i in range(64) %}{% set ns.s = ns.s X ns.s %}{% endfor %}{{ ns.s }}"


@pytest.mark.parametrize(
    ("template", "limit"),
    [
        # A nested 100000 x 100000 loop hung the server until kill -9.
        ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "TemplateLimits.steps"),
        ("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}", "TemplateLimits.steps"),
        ("{% for m in messages recursive %}{{ loop(messages) }}{% endfor %}", "TemplateLimits.depth"),
        # RecursionError, a 500 when served.
        ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "TemplateLimits.depth"),
        # MemoryError, or the process killed: strings sized before they are built.
        ("{{ 'a' * 10**10 }}", "TemplateLimits.string_chars"),
        ("{{ 'a' * 10000000000 }}", "TemplateLimits.string_chars"),  # a constant Jinja would fold at compile time
        ("{{ ([1] * 10**10) | length }}", "TemplateLimits.string_chars"),
        (DOUBLING.replace("X", "~"), "TemplateLimits.string_chars"),
        (DOUBLING.replace("X", "+"), "TemplateLimits.string_chars"),
        (
            "{% set s = namespace(v='a') %}{% for i in range(64) %}{% set t %}{{ s.v }}{{ s.v }}{% endset %}"
            "{% set s.v = t %}{% endfor %}",
            "TemplateLimits.string_chars",
        ),
        ("{{ 'a' | center(10**10) }}", "TemplateLimits.string_chars"),
        ("{{ 'a'.ljust(10**10) }}", "TemplateLimits.string_chars"),
        ("{{ 'a\nb' | indent(10**10) }}", "TemplateLimits.string_chars"),
        ("{{ '%10000000000d' % 1 }}", "TemplateLimits.string_chars"),
        ("{{ '{:>10000000000}'.format(1) }}", "TemplateLimits.string_chars"),
        ("{{ '{:>{}}'.format(1, 10**10) }}", "TemplateLimits.string_chars"),
        ("{% set s = 'a' * 100000 %}{{ s.replace('', s) }}", "TemplateLimits.string_chars"),
        ("{% set s = 'a' * 100000 %}{{ s.join(range(100000) | map('string')) }}", "TemplateLimits.string_chars"),
        ("{{ messages | tojson(indent=10**10) }}", "TemplateLimits.string_chars"),
        ("{{ [1] | slice(10**10) | list }}", "TemplateLimits.string_chars"),
        ("{{ lipsum(10**10) }}", "TemplateLimits.string_chars"),
        ("{{ 2 ** 10000000000 }}", "bits"),
        ("{% set n = namespace(x=3) %}{% for i in range(64) %}{% set n.x = n.x * n.x %}{% endfor %}", "bits"),
        ("{{ range(10**10) | list }}", "Range too big"),
    ],
)
def test_a_template_past_its_limits_is_a_chat_template_error(template: str, limit: str) -> None:
    with pytest.raises(ChatTemplateError, match=re.escape(limit)) as caught:
        render_chat(template, HI)
    assert caught.value.http_status == 400 and "\n" not in str(caught.value)


def test_rendering_has_a_time_limit() -> None:
    nested = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    with pytest.raises(ChatTemplateError, match=r"TemplateLimits\.seconds"):
        render_chat(nested, HI, limits=TemplateLimits(steps=10**12, seconds=0.05))


def test_the_template_source_is_bounded() -> None:
    with pytest.raises(ChatTemplateError, match=r"TemplateLimits\.source_chars"):
        render_chat("x" * 300_000, HI)
    with pytest.raises(ChatTemplateError, match="nested too deeply"):
        render_chat("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", HI)


def test_any_failure_inside_a_template_is_a_chat_template_error() -> None:
    with pytest.raises(ChatTemplateError, match="ZeroDivisionError"):
        render_chat("{{ 1 / 0 }}", HI)


def test_limits_leave_ordinary_templates_alone() -> None:
    template = (
        "{% macro turn(m) %}<|{{ m.role }}|>{{ m.content | trim }}{% endmacro %}"
        "{% for m in messages %}{{ turn(m) ~ '\n' }}{% if loop.last %}{{ '%-6s|' % 'end' }}{% endif %}{% endfor %}"
        "{{ ', '.join(messages | map(attribute='role')) }}{{ '{:>3}'.format(messages | length) }}"
    )
    messages = [{"role": "user", "content": f" m{i} "} for i in range(200)]
    text = render_chat(template, messages, limits=TemplateLimits(steps=5_000))
    assert text.startswith("<|user|>m0\n<|user|>m1\n") and text.endswith("end   |" + ", ".join(["user"] * 200) + "200")


# -- app.chat --------------------------------------------------------------------------------------
def test_chat_replies_through_the_template(app: Forge) -> None:
    assert asyncio.run(app.chat([{"role": "user", "content": "zza"}])) == "bcde"
    assert asyncio.run(app.chat("c")) == "defg"
    assert app.render("c") == "c"


def test_chat_stream_gives_the_reply_piece_by_piece(app: Forge) -> None:
    assert chat_stream(app, "a") == ["b", "c", "d", "e"]


def test_sync_chat_equals_async_chat(app: Forge) -> None:
    messages = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "y"},
        {"role": "user", "content": "e"},
    ]
    assert app.sync.chat(messages) == asyncio.run(app.chat(messages)) == "fgha"
    assert list(app.sync.chat_stream(messages)) == ["f", "g", "h", "a"]


def test_chat_goes_through_middleware_with_the_messages(app: Forge) -> None:
    seen: list[tuple[str, Any]] = []

    async def look(ctx: Context, next: Next) -> None:
        seen.append((ctx.prompt, ctx.messages))
        await next()

    app.use(look)
    asyncio.run(app.chat("a"))
    assert seen == [("a", [{"role": "user", "content": "a"}])]


def test_a_middleware_that_changes_the_messages_changes_the_prompt(app: Forge) -> None:
    async def rewrite(ctx: Context, next: Next) -> None:
        assert ctx.messages is not None
        ctx.messages = [*ctx.messages, {"role": "user", "content": "e"}]
        await next()

    app.use(rewrite)
    assert asyncio.run(app.chat("a")) == "fgha"


def test_chat_emits_request_and_response_events(app: Forge) -> None:
    events: list[Event] = []
    app.on("request", events.append).on("response", events.append)
    asyncio.run(app.chat("a"))
    assert [e.name for e in events] == ["request", "response"]
    assert events[1].text == "bcde"  # type: ignore[attr-defined]


def test_chat_without_a_template_stops_at_the_next_user_turn(bigram_dir: Path) -> None:
    app = Forge.load(bigram_dir, defaults=GenerationConfig(temperature=0, max_tokens=4))
    assert app.render("hi") == "User: hi\nAssistant:"
    assert app.info()["chat_template"] is False
    asyncio.run(app.chat("hi"))  # the plain template's stop is in place; the bigram model ends at once here
    with pytest.raises(ConfigError, match="role"):
        asyncio.run(app.chat([{"role": "robot", "content": "hi"}]))


def test_chat_needs_a_model() -> None:
    with pytest.raises(Exception, match="train"):
        asyncio.run(Forge("tiny").chat("hi"))


# -- stop tokens -------------------------------------------------------------------------------------
def test_generation_ends_at_any_stop_token(app: Forge) -> None:
    assert app.model is not None and app.tokenizer is not None
    tok = Tokenizer(app.tokenizer.hf, eos=app.tokenizer.eos, stop=["g"])
    assert tok.stop_ids == {app.tokenizer.eos_id, tok.hf.token_to_id("g")}
    [done] = Generator(app.model, tok).complete("a", max_tokens=10, temperature=0)
    assert (done.text, done.finish_reason) == ("bcdef", "stop")
    [free] = Generator(app.model, tok).complete("a", max_tokens=10, temperature=0, stop_at_eos=False)
    assert free.text.startswith("bcdefgh")


def test_unknown_stop_tokens_are_ignored_and_bos_is_prepended_once(app: Forge) -> None:
    assert app.tokenizer is not None
    tok = Tokenizer(app.tokenizer.hf, eos=app.tokenizer.eos, bos=app.tokenizer.eos, add_bos=True, stop=["<nope>"])
    assert tok.stop == ()
    bos = tok.bos_id
    assert tok.encode_prompt("ab") == [bos, *tok.encode("ab")]
    assert tok.encode_prompt(f"{tok.eos}ab") == [bos, *tok.encode("ab")]


def test_special_tokens_and_template_survive_save_and_load(app: Forge, tmp_path: Path) -> None:
    app.save(tmp_path / "ckpt")
    again = Forge.load(tmp_path / "ckpt")
    assert again.tokenizer is not None and again.tokenizer.chat_template == LAST
    assert again.sync.chat("a", temperature=0, max_tokens=4) == "bcde"
