"""The opt-in GET /stream endpoint of the classic relay tutorial, and the offline
demo that answers when no API key is set."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import uuid
from collections.abc import Callable

import aiohttp
import pytest

from server.relay.demo import tokenize
from server.relay.sse import SSEEvent, SSEParser

from .conftest import Rill, StartRill, wait_for
from .fakes import Reply, answer, chunk, sse, terminal, text_of
from .test_access import ALICE, BOB, TOKENS, bearer

COMPAT = {"get_stream": True}
PROMPT_MARKER = "zebra-quokka-4471"


def parse(raw: bytes) -> list[tuple[str, str]]:
    parser = SSEParser()
    events: list[SSEEvent] = [*parser.feed(raw), *parser.feed_eof()]
    return [(e.event, e.data) for e in events]


async def get_stream(rill: Rill, prompt: str | None) -> tuple[int, str, bytes]:
    url = rill.url / "stream"
    if prompt is not None:
        url = url.with_query(prompt=prompt)
    async with rill.session.get(url) as response:
        return response.status, response.headers.get("Content-Type", ""), await response.read()


# --- GET /stream ---------------------------------------------------------------------


async def test_get_stream_is_off_by_default(rill: Rill) -> None:
    status, content_type, body = await get_stream(rill, "hello")
    assert status == 404
    assert content_type.startswith("application/json")
    assert json.loads(body)["error"]["code"] == "not_found"
    await asyncio.sleep(0.15)
    assert rill.fake.requests == []
    assert len(rill.registry) == 0


def only_generation(rill: Rill) -> str:
    generations = list(rill.registry._by_id)
    assert len(generations) == 1, generations
    return generations[0]


async def test_get_stream_sends_plain_data_lines(start_rill: StartRill) -> None:
    rill = await start_rill(compat=COMPAT)
    tokens = ["Hello", " 世界 🎉", "\n", "line one\nline two", "bare\rCR", "[STREAM_END]", "!"]
    rill.fake.script(Reply(chunks=answer(tokens)))
    status, content_type, raw = await get_stream(rill, "hi")
    assert status == 200
    assert content_type == "text/event-stream"
    g = only_generation(rill)
    assert (
        raw
        == (
            f"retry: 3000\r\nid: {g}.1\r\n\r\n"  # the hint in the first block; the meta event: only its id
            f"id: {g}.2\r\ndata: Hello\r\n\r\n"
            f"id: {g}.3\r\ndata:  世界 🎉\r\n\r\n"
            f"id: {g}.4\r\ndata: \r\ndata: \r\n\r\n"  # a lone "\n" is two empty data lines: one "\n" for EventSource
            f"id: {g}.5\r\ndata: line one\r\ndata: line two\r\n\r\n"
            f"id: {g}.6\r\ndata: bare\r\ndata: CR\r\n\r\n"  # a bare CR is a line break too: it arrives as LF
            f"data: [STREAM_\r\n\r\nid: {g}.7\r\ndata: END]\r\n\r\n"  # a token that is the marker: two events
            f"id: {g}.8\r\ndata: !\r\n\r\n"
            f"id: {g}.10\r\ndata: [STREAM_END]\r\n\r\n"  # 9 is the usage, not sent here
        ).encode()
    )
    events = parse(raw)
    texts = ["Hello", " 世界 🎉", "\n", "line one\nline two", "bare\nCR", "[STREAM_", "END]", "!", "[STREAM_END]"]
    assert [data for _, data in events] == texts
    assert {name for name, _ in events} == {"message"}
    assert rill.fake.requests[0].body["messages"] == [{"role": "user", "content": "hi"}]
    await wait_for(lambda: not rill.registry.live())


async def test_get_stream_shows_a_lone_surrogate_as_a_replacement_character(start_rill: StartRill) -> None:
    # Half of an emoji's escaped pair from the upstream: not UTF-8, so not plain text.
    rill = await start_rill(compat=COMPAT)
    lone = b'data: {"choices":[{"index":0,"delta":{"content":"smile \\ud83d"}}]}\n\n'
    chunks = answer(["a", "b"])
    chunks.insert(-3, lone)
    rill.fake.script(Reply(chunks=chunks))
    async with asyncio.timeout(5):  # it used to hang here
        status, _, raw = await get_stream(rill, "hi")
    assert status == 200
    assert [data for _, data in parse(raw)] == ["a", "b", "smile \ufffd", "[STREAM_END]"]


async def test_get_stream_upstream_error_is_an_error_event_then_end(start_rill: StartRill) -> None:
    rill = await start_rill(compat=COMPAT)
    rill.fake.script(Reply(status=401, body=b'{"error": {"message": "no such key"}}'))
    status, _, raw = await get_stream(rill, "hi")
    assert status == 200
    events = parse(raw)
    assert [name for name, _ in events] == ["error", "message"]
    message = events[0][1]
    assert message.startswith("The model API rejected this server's API key (HTTP 401).")
    assert "no such key" in message
    assert not message.startswith("{")  # the human message, not the JSON of the API's error event
    assert events[1][1] == "[STREAM_END]"
    g = only_generation(rill)
    # The error has no id of its own: a drop between the two resumes before both.
    assert raw.startswith(f"retry: 3000\r\nid: {g}.1\r\n\r\nevent: error\r\ndata: The model API rejected".encode())
    assert raw.endswith(f"\r\n\r\nid: {g}.2\r\ndata: [STREAM_END]\r\n\r\n".encode())


async def test_get_stream_error_mid_answer_keeps_the_text(start_rill: StartRill) -> None:
    rill = await start_rill(compat=COMPAT)
    rill.fake.script(Reply(chunks=[chunk("partial"), sse({"error": {"message": "overloaded"}})]))
    _, _, raw = await get_stream(rill, "hi")
    events = parse(raw)
    assert [name for name, _ in events] == ["message", "error", "message"]
    assert events[0][1] == "partial"
    assert "overloaded" in events[1][1]
    assert events[2][1] == "[STREAM_END]"


@pytest.mark.parametrize("prompt", [None, "", "   ", "\n\t"])
async def test_get_stream_without_prompt_is_400(start_rill: StartRill, prompt: str | None) -> None:
    rill = await start_rill(compat=COMPAT)
    status, content_type, body = await get_stream(rill, prompt)
    assert status == 400
    assert content_type.startswith("application/json")
    assert json.loads(body)["error"]["code"] == "missing_prompt"
    await asyncio.sleep(0.15)
    assert rill.fake.requests == []
    assert len(rill.registry) == 0


async def test_get_stream_prompt_too_long_is_400(start_rill: StartRill) -> None:
    rill = await start_rill(compat=COMPAT, limits={"max_message_chars": 50})
    status, _, body = await get_stream(rill, "x" * 51)
    assert status == 400
    assert json.loads(body)["error"]["code"] == "message_too_long"
    await asyncio.sleep(0.15)
    assert rill.fake.requests == []


async def test_get_stream_prompt_never_reaches_a_log(start_rill: StartRill, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    rill = await start_rill(compat=COMPAT, limits={"max_message_chars": 100})
    rill.fake.script(Reply(chunks=answer(["ok"])))
    status, _, raw = await get_stream(rill, f"what is a {PROMPT_MARKER}?")
    assert status == 200
    assert raw.endswith(b"data: [STREAM_END]\r\n\r\n")
    status, _, _ = await get_stream(rill, PROMPT_MARKER * 10)  # refused: logged by the error middleware
    assert status == 400
    assert rill.fake.requests[0].body["messages"][0]["content"] == f"what is a {PROMPT_MARKER}?"

    def access_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "aiohttp.access" and "/stream" in r.getMessage()]

    await wait_for(lambda: len(access_lines()) == 2)
    assert any('"GET /stream" 200' in line for line in access_lines()), access_lines()
    assert any('"GET /stream" 400' in line for line in access_lines()), access_lines()
    for record in caplog.records:
        message = record.getMessage()
        assert PROMPT_MARKER not in message, (record.name, message)
        assert "prompt=" not in message, (record.name, message)
    assert PROMPT_MARKER not in caplog.text


class RawStream:
    """One GET /stream connection read as raw bytes, parsed as it goes."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.parser = SSEParser()
        self.raw = b""
        self.events: list[SSEEvent] = []

    async def read_until(self, done: Callable[[RawStream], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not done(self):
                piece = await self.response.content.readany()
                if not piece:
                    self.events.extend(self.parser.feed_eof())
                    return
                self.raw += piece
                self.events.extend(self.parser.feed(piece))

    async def read_all(self) -> None:
        await self.read_until(lambda _: False)

    @property
    def last_id(self) -> str:
        """What EventSource would send as Last-Event-ID (ids without data count too)."""
        complete = self.raw[: self.raw.rfind(b"\r\n\r\n") + 4]
        ids: list[bytes] = re.findall(rb"^id: (.*)\r$", complete, re.MULTILINE)
        return ids[-1].decode()

    @property
    def texts(self) -> list[str]:
        return [e.data for e in self.events if e.event == "message"]


async def open_raw(
    rill: Rill, prompt: str = "hi", last_event_id: str | None = None, *, session: aiohttp.ClientSession | None = None
) -> RawStream:
    headers = {"Last-Event-ID": last_event_id} if last_event_id is not None else {}
    url = (rill.url / "stream").with_query(prompt=prompt)
    response = await (session or rill.session).get(url, headers=headers)
    assert response.status == 200, await response.text()
    return RawStream(response)


async def test_a_dropped_get_stream_resumes_the_same_answer(start_rill: StartRill) -> None:
    # EventSource reconnects to the same URL with the last id it saw: the same answer
    # goes on from there, and the model is asked once.
    rill = await start_rill(compat=COMPAT)
    tokens = [f"t{i} " for i in range(12)]
    rill.fake.script(Reply(chunks=answer(tokens, delay=0.05)))
    first = await open_raw(rill)
    await first.read_until(lambda s: len(s.texts) == 4)
    first.response.close()  # the network drops mid-answer
    await asyncio.sleep(0.2)  # the monitor has seen the closed connection: nobody reads now
    generation = rill.registry.get(only_generation(rill))
    assert generation is not None
    assert generation.live  # not stopped: it may be resumed within resume_grace

    second = await open_raw(rill, last_event_id=first.last_id)
    await second.read_all()
    assert "".join(first.texts + second.texts[:-1]) == "".join(tokens)
    assert second.texts[-1] == "[STREAM_END]"
    g, seen = first.last_id.split(".")
    assert second.raw.startswith(f"retry: 3000\r\nid: {g}.{int(seen) + 1}\r\n".encode())  # no replay
    assert len(rill.fake.requests) == 1
    assert generation.terminal is not None
    assert json.loads(generation.terminal.data) == {"finish_reason": "stop"}

    # Everything delivered: 204, which tells EventSource to stop reconnecting.
    async with rill.session.get(
        (rill.url / "stream").with_query(prompt="hi"), headers={"Last-Event-ID": second.last_id}
    ) as response:
        assert response.status == 204
    # An earlier id after the end replays the tail exactly.
    replay = await open_raw(rill, last_event_id=first.last_id)
    await replay.read_all()
    assert replay.raw == second.raw
    assert len(rill.fake.requests) == 1


async def test_a_dropped_get_stream_resumes_on_another_process_in_shared_mode(
    start_rill: StartRill, redis_url: str
) -> None:
    # Behind a load balancer EventSource's reconnect may reach another process: it reads
    # the answer from Redis, in the same plain format, from the id it saw.
    shared = {"compat": COMPAT, "cluster": {"redis_url": redis_url}, "storage": {"enabled": False}}
    a = await start_rill(**shared)
    b = await start_rill(**shared)
    tokens = [f"t{i} " for i in range(12)] + ["two\nlines"]
    a.fake.script(Reply(chunks=answer(tokens, delay=0.05)))
    first = await open_raw(a)
    await first.read_until(lambda s: len(s.texts) == 4)
    first.response.close()  # the network drops mid-answer

    second = await open_raw(b, last_event_id=first.last_id)
    await second.read_all()
    assert "".join(first.texts + second.texts[:-1]) == "".join(tokens)
    assert second.texts[-1] == "[STREAM_END]"
    g, seen = first.last_id.split(".")
    assert second.raw.startswith(f"retry: 3000\r\nid: {g}.{int(seen) + 1}\r\n".encode())  # no replay
    assert len(a.fake.requests) == 1
    assert b.registry.get(g) is None  # B never asked the model

    async with b.session.get(
        (b.url / "stream").with_query(prompt="hi"), headers={"Last-Event-ID": second.last_id}
    ) as response:
        assert response.status == 204  # everything delivered
    async with b.session.get(
        (b.url / "stream").with_query(prompt="another prompt"), headers={"Last-Event-ID": first.last_id}
    ) as response:
        assert response.status == 404  # only the same prompt resumes, on any process
    # The tail read again from B is the very bytes A gives for it.
    replay_b = await open_raw(b, last_event_id=first.last_id)
    await replay_b.read_all()
    replay_a = await open_raw(a, last_event_id=first.last_id)
    await replay_a.read_all()
    assert replay_b.raw == replay_a.raw == second.raw


async def test_a_drop_before_the_first_token_resumes_too(start_rill: StartRill) -> None:
    rill = await start_rill(compat=COMPAT)
    rill.fake.script(Reply(chunks=[0.6, *answer(["late", " answer"])]))  # a queued request
    first = await open_raw(rill)
    await first.read_until(lambda s: b"\r\n\r\n" in s.raw)
    assert first.texts == []  # the meta event's id only: EventSource fires nothing for it
    generation_id = only_generation(rill)
    assert first.last_id == f"{generation_id}.1"
    first.response.close()

    second = await open_raw(rill, last_event_id=first.last_id)
    await second.read_all()
    assert second.texts == ["late", " answer", "[STREAM_END]"]
    assert len(rill.fake.requests) == 1


async def test_a_gone_get_stream_client_leaves_the_answer_for_resume_grace(start_rill: StartRill) -> None:
    rill = await start_rill(compat=COMPAT, stream={"resume_grace": 1.5})
    tokens = [f"t{i} " for i in range(40)]
    rill.fake.script(Reply(chunks=answer(tokens, delay=0.2)))  # 8 s in all
    stream = await open_raw(rill)
    await stream.read_until(lambda s: len(s.texts) == 1)
    stream.response.close()
    loop = asyncio.get_running_loop()
    closed_by_client = loop.time()
    seen = rill.fake.requests[0]
    await asyncio.sleep(0.5)
    assert not seen.closed.is_set()  # within the grace period: still running
    async with asyncio.timeout(4):
        await seen.closed.wait()  # then abandoned, as on the API, and the upstream closed
    assert seen.closed_at is not None
    assert seen.closed_at - closed_by_client >= 1.4
    generation = rill.registry.get(only_generation(rill))
    assert generation is not None
    assert generation.terminal is not None
    assert json.loads(generation.terminal.data)["code"] == "abandoned"
    assert rill.fake.open == 0


@pytest.mark.parametrize(
    "last_event_id",
    ["12", "abc", "{g}", "{g}.", "{g}.x", "{g}.-1", "{g}.1.2", "{G}.1", "{g}.1234567890123", "{g}.99"],
)
async def test_a_malformed_or_future_last_event_id_is_400(start_rill: StartRill, last_event_id: str) -> None:
    rill = await start_rill(compat=COMPAT)
    rill.fake.script(Reply(chunks=answer(["a"])))
    stream = await open_raw(rill)
    await stream.read_all()
    g = only_generation(rill)
    async with rill.session.get(
        (rill.url / "stream").with_query(prompt="hi"),
        headers={"Last-Event-ID": last_event_id.format(g=g, G=g.upper())},
    ) as response:
        assert response.status == 400
        assert json.loads(await response.read())["error"]["code"] == "bad_last_event_id"
    assert len(rill.fake.requests) == 1  # not a new generation
    assert len(rill.registry) == 1


async def test_only_the_same_client_and_prompt_may_resume(start_rill: StartRill) -> None:
    rill = await start_rill(compat=COMPAT, stream={"finished_ttl": 1.0})
    rill.fake.script(Reply(chunks=answer(["a", "b"], delay=0.3)))
    stream = await open_raw(rill, prompt="mine")
    await stream.read_until(lambda s: len(s.texts) == 1)
    last_id = stream.last_id
    _, body = await rill.post_chat()  # an answer started on the API
    api_generation = body["id"]

    async def refused(
        prompt: str, event_id: str, session: aiohttp.ClientSession | None = None, headers: dict[str, str] | None = None
    ) -> None:
        url = (rill.url / "stream").with_query(prompt=prompt)
        async with (session or rill.session).get(url, headers={"Last-Event-ID": event_id, **(headers or {})}) as r:
            assert r.status == 404, await r.text()
            assert (await r.json())["error"]["code"] == "generation_not_found"

    await refused("another prompt", last_id)
    await refused("hi", f"{api_generation}.1")
    await refused("mine", f"{uuid.uuid4().hex}.1")
    # Another client: the same loopback machine, another address.
    other = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0)))
    async with other:
        await refused("mine", last_id, other)
    # Ended and past finished_ttl: gone, and no new answer starts in its place.
    await stream.read_all()
    await wait_for(lambda: rill.registry.get(last_id.split(".")[0]) is None, timeout=5)
    await refused("mine", last_id)
    assert len(rill.fake.requests) == 2  # the /stream one and the API one


async def test_another_tokens_get_stream_answer_is_not_resumable(start_rill: StartRill) -> None:
    rill = await start_rill(environ=TOKENS, compat=COMPAT)
    rill.fake.script(Reply(chunks=answer(["a", "b"], delay=0.3)))
    url = (rill.url / "stream").with_query(prompt="hi")
    response = await rill.session.get(url, headers=bearer(ALICE))
    assert response.status == 200
    stream = RawStream(response)
    await stream.read_until(lambda s: len(s.texts) == 1)
    async with rill.session.get(url, headers={"Last-Event-ID": stream.last_id, **bearer(BOB)}) as other:
        assert other.status == 404
        assert (await other.json())["error"]["code"] == "generation_not_found"
    async with rill.session.get(url, headers={"Last-Event-ID": stream.last_id, **bearer(ALICE)}) as own:
        assert own.status == 200
        resumed = RawStream(own)
        await resumed.read_all()
    assert resumed.texts == ["b", "[STREAM_END]"]
    assert len(rill.fake.requests) == 1


# --- demo mode -------------------------------------------------------------------------


async def test_demo_mode_catalog_health_and_page(start_rill: StartRill) -> None:
    rill = await start_rill(key=False)
    async with rill.session.get(rill.url / "api/models") as response:
        models = await response.json()
    assert models["demo"] is True
    assert models["default"] == "rill-demo"
    assert [m["id"] for m in models["models"]] == ["rill-demo", "rill-demo-reasoner"]
    assert all(m["demo"] is True for m in models["models"])
    assert [m["reasoning"] for m in models["models"]] == [False, True]

    async with rill.session.get(rill.url / "healthz") as response:
        health = await response.json()
    assert health["demo"] is True
    assert health["status"] == "ok"

    async with rill.session.get(rill.url / "") as response:
        assert response.status == 200
        page = await response.text()
    assert "Demo mode" in page

    status, body = await rill.post_chat(model="fake-chat")  # the keyless provider is not offered
    assert (status, body["error"]["code"]) == (400, "unknown_model")


async def test_with_a_key_the_page_does_not_say_demo(rill: Rill) -> None:
    async with rill.session.get(rill.url / "") as response:
        assert "Demo mode" not in await response.text()


async def test_demo_answer_streams_rich_text(start_rill: StartRill) -> None:
    rill = await start_rill(key=False)
    generation_id = await rill.start_chat()
    events = await (await rill.open_stream(generation_id)).read_all()

    names = [e.event for e in events]
    assert names[0] == "meta"
    assert events[0].data["demo"] is True
    assert events[0].data["model"] == "rill-demo"
    assert events[0].data["provider"] == "demo"
    assert set(names[1:-2]) == {"delta"}
    assert names[-2:] == ["usage", "done"]
    assert terminal(events).data == {"finish_reason": "stop"}
    assert events[-2].data["completion_tokens"] == names.count("delta")

    text = text_of(events)
    assert "Demo mode" in text
    assert re.search(r"^#{1,6} \S", text, re.MULTILINE), "a Markdown heading"
    assert re.search(r"^\s*(?:[-*]|\d+\.) \S", text, re.MULTILINE), "a list"
    assert re.search(r"^```\w*\n.*?^```$", text, re.MULTILINE | re.DOTALL), "a fenced code block"
    assert re.search(r"^\|.*\|$", text, re.MULTILINE), "a table"
    assert "\n" in text
    assert re.search(r"[\u4e00-\u9fff]", text), "Chinese characters"
    assert any(ord(c) >= 0x1F300 for c in text), "an emoji"
    assert "\ufffd" not in text  # no character was split into garbage on the way

    await asyncio.sleep(0.1)
    assert rill.fake.requests == []  # the fake upstream is the configured provider: never asked


async def test_demo_reasoner_thinks_before_answering(start_rill: StartRill) -> None:
    rill = await start_rill(key=False)
    generation_id = await rill.start_chat(model="rill-demo-reasoner")
    events = await (await rill.open_stream(generation_id)).read_all()
    names = [e.event for e in events]
    assert events[0].data["reasoning"] is True
    assert "reasoning" in names
    first_delta = names.index("delta")
    assert names[1] == "reasoning"
    assert "reasoning" not in names[first_delta:]
    assert text_of(events, "reasoning").strip()
    assert "Demo mode" in text_of(events)
    assert terminal(events).data == {"finish_reason": "stop"}
    assert events[-2].data["completion_tokens_details"]["reasoning_tokens"] == names.count("reasoning")
    assert rill.fake.requests == []


async def test_demo_max_tokens_ends_with_length(start_rill: StartRill) -> None:
    rill = await start_rill(key=False)
    generation_id = await rill.start_chat(options={"max_tokens": 5})
    events = await (await rill.open_stream(generation_id)).read_all()
    assert [e.event for e in events] == ["meta", *["delta"] * 5, "usage", "done"]
    assert terminal(events).data == {"finish_reason": "length"}
    assert events[-2].data["completion_tokens"] == 5
    assert text_of(events).startswith("> **Demo mode")


async def test_demo_generation_can_be_stopped(start_rill: StartRill) -> None:
    rill = await start_rill(key=False, demo={"tokens_per_second": 10.0})  # a ~20 s answer
    generation_id = await rill.start_chat()
    reader = await rill.open_stream(generation_id)
    await reader.read_until("delta")

    loop = asyncio.get_running_loop()
    started = loop.time()
    async with rill.session.delete(rill.url / f"api/chat/{generation_id}") as response:
        assert response.status == 200
        stopped = await response.json()
    assert loop.time() - started < 2
    assert stopped["id"] == generation_id
    assert stopped["ended"] == "done"
    assert stopped["result"] == {"finish_reason": "cancelled"}

    events = await reader.read_all()
    assert terminal(events).data == {"finish_reason": "cancelled"}
    assert len([e for e in events if e.event == "delta"]) < 20
    assert not rill.registry.live()
    generation = rill.registry.get(generation_id)
    assert generation is not None
    assert not generation.upstream_open  # the request to the demo upstream is closed too
    assert rill.fake.requests == []


# --- the demo tokenizer -----------------------------------------------------------------

TEXTS = [
    "",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "line one\nline two\r\n\n  indented\tTab\rend\n",
    "流式输出：模型每生成一个词，浏览器就立刻看到它。",
    "你好，世界！🌏 Emoji and 中文 survive every split: 👩‍💻🚀",
    "mixed中文English混合 text 😀😀 🇯🇵 e\u0301 \u200b zero-width",
    "𠀀𠀁 CJK extension B, ｆｕｌｌｗｉｄｔｈ, ﾊﾝｶｸ, 한국어, にほんご",
    "\u3000ideographic space\u3000and\u2028line separator\x85next line",
    "```python\nasync def relay(events):\n    pass\n```\n| a | b |\n|---|---|\n",
]


@pytest.mark.parametrize("text", TEXTS, ids=[f"text{i}" for i in range(len(TEXTS))])
def test_tokenize_loses_nothing(text: str) -> None:
    tokens = tokenize(text)
    assert "".join(tokens) == text
    assert all(tokens), "no empty tokens"


def test_tokenize_random_text_loses_nothing() -> None:
    alphabet = "ab Z9.,-\n\r\t 　中文字你好，。😀👩‍💻🎉\u0301\u200b\ufeff"
    rng = random.Random(1234)
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert "".join(tokenize(text)) == text, repr(text)


def test_tokenize_makes_word_sized_pieces() -> None:
    assert tokenize("Hello big world") == ["Hello", " big", " world"]
    assert tokenize("流式输出") == ["流式", "输出"]
    assert len(tokenize("one two three four five six")) == 6
