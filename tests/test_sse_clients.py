"""Rill's event stream read by the SSE clients people really use: the openai SDK's
decoder and Stream, httpx-sse, sseclient-py, npm's eventsource and Chromium's
EventSource. Each must see exactly the real events: no empty event for the retry
hint or for a heartbeat (client code doing `json.loads(event.data)` crashed on them),
and each must still take the retry hint."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import pytest
from httpx_sse import aconnect_sse
from openai._streaming import SSEDecoder
from playwright.async_api import Browser, Page
from sseclient import SSEClient

from server.keys import OPEN_STREAMS
from server.relay.streaming import OpenStream

from .conftest import Rill, StartRill, wait_for
from .fakes import Reply, StreamReader, answer

NODE_CLIENT = Path(__file__).resolve().parent / "sse_clients"
RETRY_MS = 1234
# Heartbeats every 0.2 s and 0.5 s between tokens: every client reads across several.
STREAM = {"heartbeat_interval": 0.2, "liveness_interval": 0.05, "retry_ms": RETRY_MS}
TOKENS = ["one", " two", " three"]
NAMES = ["meta", "delta", "delta", "delta", "usage", "done"]


async def begin_answer(rill: Rill) -> str:
    # Two seconds before the first token: the client (a process, a browser) is connected by then.
    rill.fake.script(Reply(chunks=[2.0, *answer(TOKENS, delay=0.5)]))
    return await rill.start_chat()


async def start_answer(start_rill: StartRill, **stream: Any) -> tuple[Rill, str]:
    rill = await start_rill(stream=STREAM | stream)
    return rill, await begin_answer(rill)


def _is_client(stream: OpenStream) -> bool:
    return "aiohttp" not in stream.request.headers.get("User-Agent", "")  # not the witness


async def client_connected_before_the_first_token(rill: Rill) -> None:
    streams = rill.app[OPEN_STREAMS]
    await wait_for(lambda: any(_is_client(s) for s in streams), timeout=10)
    (stream,) = [s for s in streams if _is_client(s)]
    assert stream.cursor == 1  # only the meta event so far: it reads the answer live


def events_url(rill: Rill, generation_id: str) -> str:
    return str(rill.url / f"api/chat/{generation_id}/events")


async def witness(rill: Rill, generation_id: str) -> StreamReader:
    """A raw reader of the same answer at the same time: it shows what the wire held."""
    return await rill.open_stream(generation_id)


async def assert_wire_had_hint_and_heartbeats(reader: StreamReader) -> None:
    await reader.read_all()
    assert reader.raw.startswith(f"retry: {RETRY_MS}\r\nid: 1\r\n".encode())
    assert reader.raw.count(b"\r\n\r\n: hb\r\n") >= 3  # between whole events
    assert [e.event for e in reader.events] == NAMES


def assert_real_events(names: list[str | None], datas: list[str]) -> None:
    """Exactly the six real events, each with its JSON: nothing empty in between."""
    assert names == NAMES
    parsed = [json.loads(data) for data in datas]
    assert "".join(p["text"] for p in parsed[1:4]) == "".join(TOKENS)
    assert parsed[-1] == {"finish_reason": "stop"}


async def test_openai_sse_decoder(start_rill: StartRill) -> None:
    rill, generation_id = await start_answer(start_rill)
    wire = await witness(rill, generation_id)
    raw = bytearray()
    async with httpx2.AsyncClient() as http, http.stream("GET", events_url(rill, generation_id)) as response:

        async def tapped() -> Any:
            async for piece in response.aiter_bytes():
                raw.extend(piece)
                yield piece

        events = [sse async for sse in SSEDecoder().aiter_bytes(tapped())]
    assert_real_events([e.event for e in events], [e.data for e in events])
    assert [e.id for e in events] == [str(i) for i in range(1, 7)]
    assert [e.retry for e in events] == [RETRY_MS, None, None, None, None, None]
    assert b"\r\n\r\n: hb\r\n" in raw
    await assert_wire_had_hint_and_heartbeats(wire)


async def test_openai_async_stream(start_rill: StartRill) -> None:
    # The SDK's own Stream: it calls sse.json() on every event it decodes.
    rill, generation_id = await start_answer(start_rill)
    wire = await witness(rill, generation_id)
    client = openai.AsyncOpenAI(api_key="unused", base_url=str(rill.url))
    async with httpx2.AsyncClient() as http:
        response = await http.send(http.build_request("GET", events_url(rill, generation_id)), stream=True)
        stream = openai.AsyncStream(cast_to=object, response=response, client=client)
        items: list[Any] = [item async for item in stream]
    await client.close()
    assert len(items) == len(NAMES)
    assert items[0]["generation"] == generation_id
    assert [item["text"] for item in items[1:4]] == TOKENS
    assert items[-1] == {"finish_reason": "stop"}
    await assert_wire_had_hint_and_heartbeats(wire)


async def test_httpx_sse(start_rill: StartRill) -> None:
    rill, generation_id = await start_answer(start_rill)
    wire = await witness(rill, generation_id)
    async with httpx.AsyncClient() as http, aconnect_sse(http, "GET", events_url(rill, generation_id)) as source:
        events = [sse async for sse in source.aiter_sse()]
    assert_real_events([e.event for e in events], [e.data for e in events])
    assert [e.retry for e in events] == [RETRY_MS, None, None, None, None, None]
    await assert_wire_had_hint_and_heartbeats(wire)


async def test_sseclient_py(start_rill: StartRill) -> None:
    rill, generation_id = await start_answer(start_rill)
    wire = await witness(rill, generation_id)
    raw = bytearray()

    def read() -> list[Any]:
        with urllib.request.urlopen(events_url(rill, generation_id), timeout=10) as response:

            def tapped() -> Iterator[bytes]:
                for line in response:
                    raw.extend(line)
                    yield line

            return list(SSEClient(tapped()).events())

    events = await asyncio.to_thread(read)
    assert_real_events([e.event for e in events], [e.data for e in events])
    assert [e.retry for e in events] == [str(RETRY_MS), None, None, None, None, None]
    assert b"\r\n\r\n: hb\r\n" in raw
    await assert_wire_had_hint_and_heartbeats(wire)


def node() -> str:
    found = shutil.which("node")
    assert found is not None, "node is needed for npm's eventsource (Debian: apt-get install nodejs npm)"
    assert (NODE_CLIENT / "node_modules" / "eventsource").is_dir(), (
        "run `make test` (it runs npm ci in tests/sse_clients)"
    )
    return found


async def run_node_client(url: str) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        node(), str(NODE_CLIENT / "read_events.mjs"), url, "20000", stdout=subprocess.PIPE, cwd=NODE_CLIENT
    )
    stdout, _ = await process.communicate()
    assert process.returncode == 0, stdout
    seen: dict[str, Any] = json.loads(stdout)
    return seen


async def cut_the_client_stream(rill: Rill) -> float:
    """Aborts the client's connection (not the witness's) once it has had the first
    delta (event 2); returns when."""
    streams = rill.app[OPEN_STREAMS]
    await wait_for(lambda: any(_is_client(s) and s.cursor >= 2 for s in streams), timeout=10)
    await asyncio.sleep(0.1)  # its bytes are on their way; the next delta is 0.4 s off
    (stream,) = [s for s in streams if _is_client(s)]
    transport = stream.request.transport
    assert transport is not None
    transport.abort()
    return asyncio.get_running_loop().time()


async def test_npm_eventsource(start_rill: StartRill) -> None:
    rill, generation_id = await start_answer(start_rill)
    wire = await witness(rill, generation_id)
    client = asyncio.create_task(run_node_client(events_url(rill, generation_id)))
    await client_connected_before_the_first_token(rill)
    seen = await client
    events = seen["events"]
    assert_real_events([e["type"] for e in events], [e["data"] for e in events])
    assert [e["lastEventId"] for e in events] == [str(i) for i in range(1, 7)]
    assert seen["raw"].startswith(f"retry: {RETRY_MS}\r\n")
    assert "\r\n\r\n: hb\r\n" in seen["raw"]
    assert (seen["opens"], seen["errors"]) == (1, 0)
    await assert_wire_had_hint_and_heartbeats(wire)


async def reconnect_delay(rill: Rill, cut_at: float) -> float:
    """Seconds from the cut until the client is back, resuming by Last-Event-ID."""
    streams = rill.app[OPEN_STREAMS]
    await wait_for(lambda: any(s.request.headers.get("Last-Event-ID") for s in streams), timeout=8)
    return asyncio.get_running_loop().time() - cut_at


async def test_npm_eventsource_reconnects_after_the_retry_hint_and_resumes(start_rill: StartRill) -> None:
    # 300 ms instead of the client's own 3 s: the hint was taken.
    rill, generation_id = await start_answer(start_rill, retry_ms=300)
    client = asyncio.create_task(run_node_client(events_url(rill, generation_id)))
    await client_connected_before_the_first_token(rill)
    cut_at = await cut_the_client_stream(rill)
    delay = await reconnect_delay(rill, cut_at)
    seen = await client
    assert 0.25 <= delay < 2.0, delay
    assert seen["requests"][1]["lastEventId"] == "2"  # the meta event and the first delta
    assert (seen["opens"], seen["errors"]) == (2, 1)
    assert_real_events([e["type"] for e in seen["events"]], [e["data"] for e in seen["events"]])
    assert len(rill.fake.requests) == 1


CHROMIUM_READER = """(url) => new Promise((resolve) => {
  const seen = { events: [], opens: 0, errors: 0 };
  const source = new EventSource(url);
  source.onopen = () => seen.opens++;
  source.onerror = () => seen.errors++;
  const record = (event) => {
    seen.events.push({ type: event.type, data: event.data, lastEventId: event.lastEventId });
    if (event.type === "done") { source.close(); resolve(seen); }
  };
  for (const type of ["message", "meta", "reasoning", "delta", "usage", "done"]) source.addEventListener(type, record);
})"""


async def chromium_page(browser: Browser, start_rill: StartRill, **stream: Any) -> tuple[Rill, Page]:
    rill = await start_rill(stream=STREAM | stream)
    page = await (await browser.new_context()).new_page()
    await page.goto(str(rill.url / "healthz"))  # an empty page of Rill's own origin
    return rill, page


def chromium_reads(page: Page, generation_id: str) -> asyncio.Task[Any]:
    return asyncio.create_task(page.evaluate(CHROMIUM_READER, f"/api/chat/{generation_id}/events"))


async def test_chromium_event_source(start_rill: StartRill, browser: Browser) -> None:
    rill, page = await chromium_page(browser, start_rill)
    generation_id = await begin_answer(rill)
    wire = await witness(rill, generation_id)
    reading = chromium_reads(page, generation_id)
    await client_connected_before_the_first_token(rill)
    seen = await asyncio.wait_for(reading, 15)
    events = seen["events"]
    assert_real_events([e["type"] for e in events], [e["data"] for e in events])
    assert [e["lastEventId"] for e in events] == [str(i) for i in range(1, 7)]
    assert (seen["opens"], seen["errors"]) == (1, 0)
    await assert_wire_had_hint_and_heartbeats(wire)


async def test_chromium_reconnects_after_the_retry_hint_and_resumes(start_rill: StartRill, browser: Browser) -> None:
    rill, page = await chromium_page(browser, start_rill, retry_ms=300)
    generation_id = await begin_answer(rill)
    reading = chromium_reads(page, generation_id)
    await client_connected_before_the_first_token(rill)
    cut_at = await cut_the_client_stream(rill)
    delay = await reconnect_delay(rill, cut_at)
    seen = await asyncio.wait_for(reading, 15)
    assert 0.25 <= delay < 2.0, delay
    assert (seen["opens"], seen["errors"]) == (2, 1)
    assert_real_events([e["type"] for e in seen["events"]], [e["data"] for e in seen["events"]])
    assert len(rill.fake.requests) == 1


@pytest.mark.parametrize("piece", [1, 7])
def test_openai_decoder_over_any_split_of_the_wire(piece: int) -> None:
    # The same bytes split anywhere (a heartbeat or the hint cut in two) decode the same.
    wire = (
        f"retry: {RETRY_MS}\r\nid: 1\r\nevent: meta\r\ndata: {{}}\r\n\r\n: hb\r\n: hb\r\n"
        'id: 2\r\nevent: delta\r\ndata: {"text":"a"}\r\n\r\n: hb\r\n'
    ).encode()
    pieces = [wire[i : i + piece] for i in range(0, len(wire), piece)]
    events = list(SSEDecoder().iter_bytes(iter(pieces)))
    assert [(e.event, e.data, e.retry) for e in events] == [("meta", "{}", RETRY_MS), ("delta", '{"text":"a"}', None)]
