"""The Python openai client's answers to requests the JS tests make too, to compare them.

    python openai_client.py < {"base_url": ..., "api_key": ..., "requests": [{"route", "body"}, ...]}

Prints one JSON list: per request its text, tool calls (name, parsed arguments) and finish reason.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from openai import OpenAI


def answer(client: OpenAI, route: str, body: dict[str, Any]) -> dict[str, Any]:
    if route == "completions":
        if body.get("stream"):
            chunks = list(client.completions.create(**body))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            finish = next(c.choices[0].finish_reason for c in reversed(chunks) if c.choices)
            return {"text": text, "tool_calls": [], "finish_reason": finish}
        reply = client.completions.create(**body)
        return {"text": reply.choices[0].text, "tool_calls": [], "finish_reason": reply.choices[0].finish_reason}
    if body.get("stream"):
        text, calls, finish = "", {}, None
        for chunk in client.chat.completions.create(**body):
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            text += delta.content or ""
            for call in delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"name": "", "arguments": ""})
                entry["name"] += call.function.name or ""
                entry["arguments"] += call.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        tool_calls = [{"name": c["name"], "arguments": json.loads(c["arguments"])} for c in calls.values()]
        return {"text": text, "tool_calls": tool_calls, "finish_reason": finish}
    reply = client.chat.completions.create(**body)
    message = reply.choices[0].message
    tool_calls = [
        {"name": c.function.name, "arguments": json.loads(c.function.arguments)} for c in message.tool_calls or []
    ]
    return {"text": message.content or "", "tool_calls": tool_calls, "finish_reason": reply.choices[0].finish_reason}


def main() -> None:
    given = json.load(sys.stdin)
    client = OpenAI(base_url=f"{given['base_url']}/v1", api_key=given["api_key"], max_retries=0)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda r: answer(client, r["route"], r["body"]), given["requests"]))
    json.dump(answers, sys.stdout)


if __name__ == "__main__":
    main()
