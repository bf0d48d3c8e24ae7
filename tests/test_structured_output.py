"""Structured output (issue 13 item 1): ``output_config.format`` reaches every upstream format in that format's own
words, or is refused with a 400 naming the field where the provider cannot constrain its answer.

Over loopback with real clients: the anthropic SDK's ``messages.parse`` / ``messages.stream`` with
``output_format=<pydantic model>`` and LangChain's ``ChatAnthropic.with_structured_output(method="json_schema")``,
against a scripted upstream per format that checks what arrived and answers JSON.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from typing import Any

import anthropic
import orjson
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from relay.config import Provider
from relay.formats import fields
from relay.formats.anthropic_passthrough.request import retarget
from relay.formats.base import ClientRequest
from relay.formats.gemini import request as G
from relay.formats.openai_chat.request import build as openai_build
from relay.formats.openai_responses import request as R
from relay.formats.structured import strict_schema
from relay.errors import RelayError
from tests.conftest import RELAY_KEY
from tests.format_mocks import (
    anthropic_sse,
    anthropic_text_events,
    client,
    completed,
    created,
    format_relay,
    gemini_chunk,
    gemini_sse,
    gemini_usage,
    response_obj,
    responses_sse,
    run,
    text_events,
)
from tests.mock_upstream import MockUpstream, Recorded, Reply, completion, json_reply, text_stream


class Address(BaseModel):
    city: str
    zip: str | None = None


class Person(BaseModel):
    name: str
    age: int
    tags: list[str] = []
    address: Address | None = None


ANSWER = {"name": "Ada", "age": 36, "tags": ["math"], "address": {"city": "London", "zip": None}}
TEXT = json.dumps(ANSWER)
SCHEMA = {"type": "object", "title": "Person", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name"], "additionalProperties": False}
REQ = {"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "who?"}],
       "output_config": {"format": {"type": "json_schema", "schema": SCHEMA}}}
OPENAI = Provider(name="o", base_url="http://x")
USER = [{"role": "user", "content": "Describe Ada Lovelace."}]


# ---- the request, per format -------------------------------------------------------------------------

def test_openai_chat_response_format() -> None:
    body, dropped = openai_build(REQ, OPENAI, "gpt-x", False)
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "Person", "schema": SCHEMA}}
    assert "output_config" not in dropped


def test_openai_strict_narrows_the_schema() -> None:
    body, _ = openai_build(REQ, replace(OPENAI, structured_output="strict"), "gpt-x", False)
    sent = body["response_format"]["json_schema"]
    assert sent["strict"] is True and sent["name"] == "Person"
    assert sent["schema"]["required"] == ["name", "age"] and sent["schema"]["additionalProperties"] is False
    assert SCHEMA["required"] == ["name"]  # the client's own schema is not changed in place


def test_responses_text_format() -> None:
    provider = Provider(name="r", base_url="http://x", format="openai-responses", structured_output="strict")
    body, _ = R.build(REQ, provider, "gpt-x", False)
    assert body["text"] == {"format": {"type": "json_schema", "name": "Person", "strict": True,
                                       "schema": {**SCHEMA, "required": ["name", "age"]}}}


def test_gemini_response_schema_goes_through_the_cleaner() -> None:
    provider = Provider(name="g", base_url="http://x", format="gemini")
    body, _ = G.build(REQ, provider, "gemini-x", False)
    config = body["generationConfig"]
    assert config["responseMimeType"] == "application/json"
    assert config["responseSchema"] == {"type": "object", "title": "Person", "required": ["name"],
                                        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}
    assert "additionalProperties" not in json.dumps(config)  # a keyword Gemini refuses


def test_anthropic_passthrough_is_untouched() -> None:
    raw = orjson.dumps(REQ)
    provider = Provider(name="a", base_url="http://x", format="anthropic", structured_output="none")
    assert retarget(REQ, provider, "m", ClientRequest(raw, REQ)) == raw


def test_older_beta_spelling_output_format() -> None:
    req = {**{k: v for k, v in REQ.items() if k != "output_config"},
           "output_format": {"type": "json_schema", "schema": SCHEMA}}
    body, dropped = openai_build(req, OPENAI, "gpt-x", False)
    assert body["response_format"]["json_schema"]["schema"] == SCHEMA and not dropped


@pytest.mark.parametrize("fmt", ["openai", "gemini", "openai-responses"])
def test_provider_that_cannot_is_refused_naming_the_field(fmt: str) -> None:
    provider = Provider(name="ds", base_url="http://x", format=fmt, structured_output="none")
    build = {"openai": openai_build, "gemini": G.build, "openai-responses": R.build}[fmt]
    with pytest.raises(RelayError) as caught:
        build(REQ, provider, "m", False)
    err = caught.value
    assert (err.status, err.error_type) == (400, "invalid_request_error")
    assert err.message.startswith("output_config.format: ") and "'ds'" in err.message


@pytest.mark.parametrize("bad, where", [
    ({"output_config": "json"}, "output_config: expected an object"),
    ({"output_config": {"format": "json"}}, "output_config.format: expected an object"),
    ({"output_config": {"format": {"type": "json_object"}}}, "output_config.format.type"),
    ({"output_config": {"format": {"type": "json_schema"}}}, "output_config.format.schema"),
])
def test_malformed_format_is_a_400(bad: dict[str, Any], where: str) -> None:
    with pytest.raises(RelayError) as caught:
        openai_build({**REQ, **bad}, OPENAI, "m", False)
    assert caught.value.status == 400 and caught.value.message.startswith(where)


def test_effort_alone_is_not_structured_output() -> None:
    body, dropped = openai_build({**REQ, "output_config": {"effort": "high"}}, OPENAI, "m", False)
    assert "response_format" not in body and "thinking/output_config.effort" in " ".join(dropped)


# ---- strict narrowing: never widens ------------------------------------------------------------------

def test_strict_narrowing_of_an_sdk_schema() -> None:
    from anthropic.lib._parse._transform import transform_schema

    schema = transform_schema(Person)
    narrowed = strict_schema(schema)
    assert narrowed is not None
    assert narrowed["required"] == ["name", "age", "tags", "address"]
    assert narrowed["$defs"]["Address"]["required"] == ["city", "zip"]
    # optional stays optional-valued (no null added): every strict answer is valid for the client's model
    assert narrowed["properties"]["tags"]["type"] == "array"


@pytest.mark.parametrize("schema", [
    {"type": "object", "additionalProperties": {"type": "string"}},  # a free-form map
    {"type": "object", "properties": {"m": {"type": "object"}}},  # a nested object with any keys
    {"type": "array", "items": {"type": "string"}},  # strict mode needs an object at the root
])
def test_schemas_strict_mode_cannot_say_go_unstrict(schema: dict[str, Any]) -> None:
    assert strict_schema(schema) is None
    body, _ = openai_build({**REQ, "output_config": {"format": {"type": "json_schema", "schema": schema}}},
                           replace(OPENAI, structured_output="strict"), "m", False)
    assert body["response_format"]["json_schema"] == {"name": "output", "schema": schema, "strict": False}


PROPS = st.dictionaries(st.sampled_from(["a", "b", "c"]), st.sampled_from([{"type": "string"}, {"type": "integer"}]),
                        max_size=3)


@settings(max_examples=100, deadline=None)
@given(props=PROPS, required=st.lists(st.sampled_from(["a", "b", "c"]), unique=True), data=st.data())
def test_strict_answers_are_valid_client_answers(props: dict[str, Any], required: list[str], data: st.DataObject) -> None:
    """Whatever the strict schema accepts, the client's schema accepts: narrowed, never widened."""
    schema = {"type": "object", "properties": props, "required": [r for r in required if r in props]}
    narrowed = strict_schema(schema)
    assert narrowed is not None
    answer = {k: data.draw(st.text() if v["type"] == "string" else st.integers()) for k, v in props.items()}
    assert set(narrowed["required"]) == set(props) and set(answer) == set(props)
    assert set(schema["required"]) <= set(answer)


# ---- the field table --------------------------------------------------------------------------------

def test_every_messages_api_parameter_has_a_fate() -> None:
    """The installed SDK's messages.create parameters (the current API reference) are all in the table."""
    import inspect

    params = set(inspect.signature(anthropic.Anthropic(api_key="x").messages.create).parameters)
    params -= {"extra_headers", "extra_query", "extra_body", "timeout"}
    assert params <= set(fields.FIELDS), params - set(fields.FIELDS)
    reference = json.loads(open("tests/fixtures/reference/claude-code-2.1.331-request-1.json").read())
    body = reference.get("body", reference)
    assert set(body) <= set(fields.FIELDS)


def test_unknown_and_dropped_fields_are_named() -> None:
    dropped: set[str] = set()
    fields.audit({"model": "m", "speed": "fast", "surprise": 1, "stop_sequences": ["x"]}, "openai-responses", dropped)
    assert dropped == {"speed", f"surprise ({fields.UNKNOWN})", "stop_sequences"}


# ---- over loopback: the SDK and LangChain as clients ------------------------------------------------------

def openai_reply(rec: Recorded) -> Reply:
    return text_stream(TEXT[:10], TEXT[10:]) if rec.json.get("stream") else completion({"content": TEXT})


def responses_reply(rec: Recorded) -> Reply:
    if rec.json.get("stream"):
        return responses_sse(created(), *text_events(TEXT[:10], TEXT[10:]), completed())
    return json_reply(response_obj([{"type": "message", "content": [{"type": "output_text", "text": TEXT}]}]))


def gemini_reply(rec: Recorded) -> Reply:
    chunk = gemini_chunk({"text": TEXT}, finish="STOP", usage=gemini_usage())
    return gemini_sse(chunk) if rec.path.endswith("alt=sse") else json_reply(chunk)


def anthropic_reply(rec: Recorded) -> Reply:
    events = anthropic_text_events(TEXT)
    if rec.json.get("stream"):
        return anthropic_sse(*events)
    message = {**events[0]["message"], "content": [{"type": "text", "text": TEXT}], "stop_reason": "end_turn"}
    return json_reply(message)


def arrived(fmt: str, rec: Recorded) -> Any:
    """The schema as the upstream received it."""
    body = rec.json
    if fmt == "openai":
        assert body["response_format"]["type"] == "json_schema"
        return body["response_format"]["json_schema"]["schema"]
    if fmt == "openai-responses":
        assert body["text"]["format"]["type"] == "json_schema"
        return body["text"]["format"]["schema"]
    if fmt == "gemini":
        assert body["generationConfig"]["responseMimeType"] == "application/json"
        return body["generationConfig"]["responseSchema"]
    return body["output_config"]["format"]["schema"]  # anthropic: the client's own words


REPLIES = {"openai": openai_reply, "openai-responses": responses_reply, "gemini": gemini_reply,
           "anthropic": anthropic_reply}


@pytest.mark.parametrize("stream", [False, True], ids=["parse", "stream"])
@pytest.mark.parametrize("fmt", sorted(REPLIES))
async def test_sdk_parse_over_loopback(nursery: trio.Nursery, fmt: str, stream: bool) -> None:
    upstream = MockUpstream(REPLIES[fmt])
    await nursery.start(upstream.serve)
    relay = await format_relay(nursery, upstream, fmt)

    def go() -> Any:
        sdk = client(relay)
        if stream:
            with sdk.messages.stream(model="up-model", max_tokens=200, messages=USER, output_format=Person) as s:
                return s.get_final_message()
        return sdk.messages.parse(model="up-model", max_tokens=200, messages=USER, output_format=Person)

    message = await run(go)
    assert message.parsed_output == Person.model_validate(ANSWER)
    schema = arrived(fmt, upstream.requests[0])
    assert set(schema["properties"]) == {"name", "age", "tags", "address"}


async def test_sdk_parse_refused_where_the_provider_cannot(nursery: trio.Nursery) -> None:
    upstream = MockUpstream(openai_reply)
    await nursery.start(upstream.serve)
    relay = await format_relay(nursery, upstream, "openai", 'preset = "deepseek"')
    with pytest.raises(anthropic.BadRequestError) as caught:
        await run(lambda: client(relay).messages.parse(model="up-model", max_tokens=50, messages=USER,
                                                       output_format=Person))
    assert caught.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert caught.value.body["error"]["message"].startswith("output_config.format: ")  # type: ignore[index]
    assert upstream.requests == []  # refused by relay, not after a round trip


async def test_openai_strict_end_to_end(nursery: trio.Nursery) -> None:
    upstream = MockUpstream(openai_reply)
    await nursery.start(upstream.serve)
    relay = await format_relay(nursery, upstream, "openai", 'structured_output = "strict"')
    message = await run(lambda: client(relay).messages.parse(model="up-model", max_tokens=200, messages=USER,
                                                             output_format=Person))
    assert message.parsed_output == Person.model_validate(ANSWER)
    sent = upstream.requests[0].json["response_format"]["json_schema"]
    assert sent["strict"] is True and sent["schema"]["required"] == ["name", "age", "tags", "address"]


@pytest.mark.parametrize("fmt", ["openai", "gemini"])
async def test_langchain_with_structured_output(nursery: trio.Nursery, fmt: str) -> None:
    from langchain_anthropic import ChatAnthropic

    upstream = MockUpstream(REPLIES[fmt])
    await nursery.start(upstream.serve)
    relay = await format_relay(nursery, upstream, fmt)
    model = ChatAnthropic(model="up-model", base_url=relay.url, api_key=RELAY_KEY, max_retries=0, max_tokens=200)
    structured = model.with_structured_output(Person, method="json_schema")
    person = await run(lambda: structured.invoke("Describe Ada Lovelace."))
    assert person == Person.model_validate(ANSWER)
    assert set(arrived(fmt, upstream.requests[0])["properties"]) == {"name", "age", "tags", "address"}


def test_readme_field_table_is_the_code_table() -> None:
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("**Top-level request fields.**"):]
    rows = re.findall(r"^\| `([a-z_]+)` \| (\w+) \| (\w+) \| (\w+) \| (.+) \|$", section.split("\n\n")[1], re.M)
    assert {name: (o, g, r, note) for name, o, g, r, note in rows} == {
        name: (f.openai, f.gemini, f.responses, f.note) for name, f in fields.FIELDS.items()}
