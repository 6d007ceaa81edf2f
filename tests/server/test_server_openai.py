"""The server through the official OpenAI client: shapes, streaming, sampling options, errors.

Exact texts come from the bigram server (greedy from "a" is "bcdefgh..."),
sampling from the random tiny server.
"""

from __future__ import annotations

import math

import openai
import pytest
from serving import ServerProcess

GREEDY = {"temperature": 0}


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# -- chat --------------------------------------------------------------------------------------------------------------


def test_chat_completion(bigram_server: ServerProcess) -> None:
    result = bigram_server.client().chat.completions.create(model="bigram", messages=chat("a"), max_tokens=4, **GREEDY)
    assert result.object == "chat.completion"
    assert result.id.startswith("chatcmpl-")
    assert result.model == "bigram"
    assert isinstance(result.created, int)
    [choice] = result.choices
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content == "bcde"
    assert choice.finish_reason == "length"
    assert choice.logprobs is None
    assert result.usage is not None
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens) == (1, 4, 5)


def test_chat_stream(bigram_server: ServerProcess) -> None:
    stream = bigram_server.client().chat.completions.create(
        model="bigram", messages=chat("a"), max_tokens=5, stream=True, **GREEDY
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "bcdef"
    assert [c.choices[0].delta.content for c in chunks[1:-1]] == list("bcdef")  # one piece per token
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert all(c.usage is None for c in chunks)


def test_chat_stream_usage(bigram_server: ServerProcess) -> None:
    stream = bigram_server.client().chat.completions.create(
        model="bigram",
        messages=chat("a"),
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    chunks = list(stream)
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (1, 3, 4)
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_ends_at_end_of_text(bigram_server: ServerProcess) -> None:
    result = bigram_server.client().chat.completions.create(model="bigram", messages=chat("v"), max_tokens=10, **GREEDY)
    assert result.choices[0].message.content == "wx"
    assert result.choices[0].finish_reason == "stop"


def test_chat_message_parts_and_developer_role(bigram_server: ServerProcess) -> None:
    messages = [
        {"role": "developer", "content": "h"},
        {"role": "user", "content": [{"type": "text", "text": "a"}]},
    ]
    result = bigram_server.client().chat.completions.create(
        model="bigram",
        messages=messages,
        max_tokens=2,
        **GREEDY,  # type: ignore[arg-type]
    )
    assert result.choices[0].message.content == "bc"  # the template joins the contents: "ha"


def test_max_completion_tokens(bigram_server: ServerProcess) -> None:
    result = bigram_server.client().chat.completions.create(
        model="bigram", messages=chat("a"), max_completion_tokens=2, **GREEDY
    )
    assert result.choices[0].message.content == "bc"


# -- completions -------------------------------------------------------------------------------------------------------


def test_completion(bigram_server: ServerProcess) -> None:
    result = bigram_server.client().completions.create(model="bigram", prompt="a", max_tokens=4, **GREEDY)
    assert result.object == "text_completion"
    assert result.id.startswith("cmpl-")
    [choice] = result.choices
    assert (choice.text, choice.finish_reason, choice.index) == ("bcde", "length", 0)
    assert result.usage is not None and result.usage.total_tokens == 5


def test_completion_list_prompt(bigram_server: ServerProcess) -> None:
    result = bigram_server.client().completions.create(model="bigram", prompt=["a", "d", "v"], max_tokens=3, **GREEDY)
    assert [c.text for c in result.choices] == ["bcd", "efg", "wx"]
    assert [c.index for c in result.choices] == [0, 1, 2]
    assert [c.finish_reason for c in result.choices] == ["length", "length", "stop"]
    assert result.usage is not None
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (3, 8)


def test_completion_stream(bigram_server: ServerProcess) -> None:
    stream = bigram_server.client().completions.create(
        model="bigram", prompt="c", max_tokens=3, stream=True, stream_options={"include_usage": True}, **GREEDY
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "def"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


def test_stop(bigram_server: ServerProcess) -> None:
    client = bigram_server.client()
    result = client.completions.create(model="bigram", prompt="a", max_tokens=10, stop="e", **GREEDY)
    assert (result.choices[0].text, result.choices[0].finish_reason) == ("bcd", "stop")
    result = client.chat.completions.create(
        model="bigram", messages=chat("a"), max_tokens=10, stop=["fg", "d"], **GREEDY
    )
    assert (result.choices[0].message.content, result.choices[0].finish_reason) == ("bc", "stop")


def test_n_choices(bigram_server: ServerProcess) -> None:
    client = bigram_server.client()
    result = client.chat.completions.create(model="bigram", messages=chat("a"), max_tokens=3, n=3, **GREEDY)
    assert [c.index for c in result.choices] == [0, 1, 2]
    assert [c.message.content for c in result.choices] == ["bcd"] * 3
    assert result.usage is not None
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (1, 9)  # the prompt counts once


def test_n_choices_stream(bigram_server: ServerProcess) -> None:
    stream = bigram_server.client().chat.completions.create(
        model="bigram", messages=chat("a"), max_tokens=3, n=2, stream=True, **GREEDY
    )
    texts = {0: "", 1: ""}
    finished = {}
    for c in stream:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert texts == {0: "bcd", 1: "bcd"}
    assert finished == {0: "length", 1: "length"}


def test_seed_reproducible(tiny_server: ServerProcess) -> None:
    client = tiny_server.client()

    def sample(seed: int, n: int = 1) -> list[str]:
        result = client.completions.create(model="tiny", prompt="to be", max_tokens=24, temperature=1.0, seed=seed, n=n)
        return [c.text for c in result.choices]

    assert sample(7) == sample(7)
    assert len(set(sample(1) + sample(2) + sample(3))) > 1
    both = sample(7, n=2)
    assert both[0] == sample(7)[0]  # choice i samples with seed + i
    assert both[1] == sample(8)[0]
    assert both[0] != both[1]


def test_chat_logprobs(bigram_server: ServerProcess) -> None:
    result = bigram_server.client().chat.completions.create(
        model="bigram", messages=chat("a"), max_tokens=3, logprobs=True, top_logprobs=2, **GREEDY
    )
    logprobs = result.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert [t.token for t in logprobs.content] == ["b", "c", "d"]
    for token in logprobs.content:
        assert -0.01 < token.logprob <= 0  # the bigram model is sure
        assert token.bytes == list(token.token.encode())
        assert len(token.top_logprobs) == 2
        assert token.top_logprobs[0].token == token.token


def test_chat_logprobs_stream(bigram_server: ServerProcess) -> None:
    stream = bigram_server.client().chat.completions.create(
        model="bigram", messages=chat("a"), max_tokens=3, logprobs=True, stream=True, **GREEDY
    )
    chunks = [c.choices[0] for c in stream if c.choices]
    tokens = [t.token for c in chunks if c.logprobs for t in c.logprobs.content]
    assert tokens == ["b", "c", "d"]
    # Each piece of text comes with the logprobs of its own tokens, not all of them at the end.
    with_text = [c for c in chunks if c.delta.content]
    assert [c.delta.content for c in with_text] == ["b", "c", "d"]
    assert all(c.logprobs and "".join(t.token for t in c.logprobs.content) == c.delta.content for c in with_text)


def test_completion_logprobs_stream_keep_their_text_offsets(bigram_server: ServerProcess) -> None:
    stream = bigram_server.client().completions.create(
        model="bigram", prompt="a", max_tokens=3, logprobs=1, stream=True, **GREEDY
    )
    chunks = [c.choices[0] for c in stream if c.choices and c.choices[0].logprobs]
    assert [t for c in chunks for t in c.logprobs.tokens] == ["b", "c", "d"]  # type: ignore[union-attr]
    assert [o for c in chunks for o in c.logprobs.text_offset] == [0, 1, 2]  # type: ignore[union-attr]


def test_completion_logprobs(bigram_server: ServerProcess) -> None:
    result = bigram_server.client().completions.create(model="bigram", prompt="a", max_tokens=3, logprobs=2, **GREEDY)
    logprobs = result.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.tokens == ["b", "c", "d"]
    assert logprobs.text_offset == [0, 1, 2]
    assert logprobs.token_logprobs is not None and all(-0.01 < lp <= 0 for lp in logprobs.token_logprobs)
    assert logprobs.top_logprobs is not None and all(len(top) == 2 for top in logprobs.top_logprobs)


def test_extra_fields_are_ignored(bigram_server: ServerProcess) -> None:
    result = bigram_server.client().completions.create(
        model="bigram",
        prompt="a",
        max_tokens=2,
        user="alice",
        extra_body={"top_k": 1, "logit_bias_unknown": {"1": 2}, "some_future_field": [1, 2]},
        **GREEDY,
    )
    assert result.choices[0].text == "bc"
    assert result.model == "bigram"


# -- models and embeddings ---------------------------------------------------------------------------------------------


def test_models(bigram_server: ServerProcess) -> None:
    client = bigram_server.client()
    models = client.models.list()
    assert [m.id for m in models.data] == ["bigram"]
    assert models.data[0].object == "model"
    assert models.data[0].owned_by == "forge"
    assert client.models.retrieve("bigram").id == "bigram"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert e.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_embeddings(tiny_server: ServerProcess) -> None:
    client = tiny_server.client()
    result = client.embeddings.create(model="tiny", input=["to be", "or not", "to be"])  # base64 on the wire
    assert result.object == "list"
    assert [d.index for d in result.data] == [0, 1, 2]
    vectors = [d.embedding for d in result.data]
    assert all(len(v) == 128 for v in vectors)  # the tiny preset's d_model
    assert all(math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-4) for v in vectors)
    assert vectors[0] == pytest.approx(vectors[2])
    assert vectors[0] != pytest.approx(vectors[1])
    assert result.usage.prompt_tokens == result.usage.total_tokens == 5 + 6 + 5
    floats = client.embeddings.create(model="tiny", input="to be", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(vectors[0], abs=1e-6)


# -- errors, as the client sees them -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"temperature": 3}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"stop": [""]}, "stop[0]"),
        ({"seed": 2**70}, "seed"),
        ({"presence_penalty": -3}, "presence_penalty"),
        ({"top_logprobs": 2}, "top_logprobs"),  # needs logprobs=true
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ],
)
def test_bad_chat_values(bigram_server: ServerProcess, options: dict[str, object], param: str) -> None:
    client = bigram_server.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="bigram", messages=chat("a"), extra_body=options)  # type: ignore[arg-type]
    assert e.value.status_code == 400
    assert e.value.param == param, e.value.message
    assert e.value.type == "invalid_request_error"


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([], "messages"),
        ([{"role": "wizard", "content": "hi"}], "messages[0].role"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "messages[0].content[0].type",
        ),
        ([{"content": "hi"}], "messages[0].role"),
    ],
)
def test_bad_messages(bigram_server: ServerProcess, messages: list[object], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        bigram_server.client().chat.completions.create(model="bigram", messages=messages)  # type: ignore[arg-type]
    assert e.value.param == param, e.value.message


def test_missing_prompt(bigram_server: ServerProcess) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        bigram_server.client().post("/completions", body={"max_tokens": 2}, cast_to=object)
    assert e.value.param == "prompt"
    assert "missing" in e.value.message


def test_prompt_longer_than_context(bigram_server: ServerProcess) -> None:
    client = bigram_server.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="bigram", prompt="a" * 100, max_tokens=1)
    assert e.value.param == "prompt"
    assert e.value.code == "context_length_exceeded"
    assert "100" in e.value.message and "64" in e.value.message  # both counts
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="bigram", messages=chat("a" * 64))
    assert e.value.param == "messages"


def test_max_tokens_past_context(bigram_server: ServerProcess) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        bigram_server.client().completions.create(model="bigram", prompt="a" * 10, max_tokens=60)
    assert e.value.param == "max_tokens"
    assert e.value.code == "context_length_exceeded"
    for count in ("64", "10", "60", "70"):
        assert count in e.value.message
    # Without max_tokens the completion fills the rest of the context, and says so.
    result = bigram_server.client().completions.create(model="bigram", prompt="a" * 10, **GREEDY)
    assert result.usage is not None and result.usage.completion_tokens == 54
    assert result.choices[0].finish_reason == "length"


def test_wrong_api_key(bigram_server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{bigram_server.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        client.models.list()
    assert e.value.status_code == 401
    assert e.value.code == "invalid_api_key"
