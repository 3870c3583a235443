"""Generation lifecycle: resume, Stop, closed tabs, the grace period, slow readers,
heartbeats, retention, and shutdown with live streams."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
import uuid

import aiohttp
import pytest

from server.keys import OPEN_STREAMS, SESSION

from .conftest import Rill, StartRill, wait_for
from .fakes import Reply, answer, chunk, open_live_streams, sse, terminal, text_of

TOKENS = [f"t{i} " for i in range(30)]


async def test_resume_mid_answer_has_no_gap_no_duplicate_and_one_upstream_request(rill: Rill) -> None:
    rill.fake.script(Reply(chunks=answer(TOKENS, delay=0.02)))
    generation_id = await rill.start_chat()
    first = await rill.open_stream(generation_id)
    for _ in range(8):
        await first.read_until("delta")
    first.response.close()  # the network drops
    last_id = first.events[-1].id

    second = await rill.open_stream(generation_id, last_event_id=last_id)
    await second.read_all()

    ids = [int(e.id) for e in first.events + second.events]
    assert ids == list(range(1, len(ids) + 1)), "gap or duplicate across the resume"
    assert text_of(first.events + second.events) == "".join(TOKENS)
    assert terminal(second.events).data == {"finish_reason": "stop"}
    assert len(rill.fake.requests) == 1


async def test_two_readers_of_one_generation_see_the_same_events(rill: Rill) -> None:
    rill.fake.script(Reply(chunks=answer(TOKENS, delay=0.01)))
    generation_id = await rill.start_chat()
    readers = [await rill.open_stream(generation_id) for _ in range(2)]
    results = await asyncio.gather(*(r.read_all() for r in readers))
    assert [(e.id, e.data) for e in results[0]] == [(e.id, e.data) for e in results[1]]
    assert len(rill.fake.requests) == 1


async def test_stop_closes_the_upstream_at_once_and_reports_cancelled(rill: Rill) -> None:
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    rill.fake.script(
        Reply(
            chunks=[chunk("Hello"), sse({"choices": [{"index": 0, "delta": {"content": " there"}}], "usage": usage})],
            end="hang",
        )
    )
    generation_id = await rill.start_chat()
    reader = await rill.open_stream(generation_id)
    await reader.read_until("delta")
    await reader.read_until("delta")

    loop = asyncio.get_running_loop()
    stopped_at = loop.time()
    async with rill.session.delete(rill.url / f"api/chat/{generation_id}") as response:
        assert response.status == 200
        body = await response.json()
    seen = rill.fake.requests[0]
    async with asyncio.timeout(1.0):
        await seen.closed.wait()
    assert seen.closed_at is not None
    assert seen.closed_at - stopped_at < 1.0
    assert body["result"] == {"finish_reason": "cancelled"}

    events = await reader.read_all()
    assert [e.event for e in events][-2:] == ["usage", "done"]
    assert events[-2].data == usage
    assert terminal(events).data == {"finish_reason": "cancelled"}
    assert text_of(events) == "Hello there"

    async with rill.session.delete(rill.url / f"api/chat/{generation_id}") as response:
        assert response.status == 200  # idempotent
        assert (await response.json())["result"] == {"finish_reason": "cancelled"}
    assert len(rill.fake.requests) == 1
    generation = rill.registry.get(generation_id)
    assert generation is not None
    await generation.wait_closed()
    assert generation._task is not None
    assert generation._task.cancelled(), "the upstream task must end cancelled, not swallow it"


async def test_stop_after_the_end_changes_nothing(rill: Rill) -> None:
    generation_id = await rill.start_chat()
    events = await (await rill.open_stream(generation_id)).read_all()
    async with rill.session.delete(rill.url / f"api/chat/{generation_id}") as response:
        assert (await response.json())["result"] == {"finish_reason": "stop"}
    again = await (await rill.open_stream(generation_id)).read_all()
    assert [e.data for e in again] == [e.data for e in events]


async def test_closed_tab_is_noticed_without_tokens_and_upstream_closed_after_grace(
    start_rill: StartRill,
) -> None:
    rill = await start_rill(stream={"resume_grace": 0.5, "liveness_interval": 0.1})
    rill.fake.script(Reply(chunks=[chunk("only token")], end="hang"))  # then silence
    generation_id = await rill.start_chat()
    reader = await rill.open_stream(generation_id)
    await reader.read_until("delta")
    streams = rill.app[OPEN_STREAMS]
    assert len(streams) == 1

    loop = asyncio.get_running_loop()
    closed_at = loop.time()
    reader.response.close()  # the tab is closed while no token flows
    await wait_for(lambda: len(streams) == 0, timeout=1.0)
    seen = rill.fake.requests[0]
    async with asyncio.timeout(0.5 + 1.0):
        await seen.closed.wait()
    assert seen.closed_at is not None
    assert seen.closed_at - closed_at >= 0.45, "the upstream must survive the grace period"

    events = await (await rill.open_stream(generation_id)).read_all()
    error = terminal(events)
    assert error.event == "error"
    assert error.data["code"] == "abandoned"
    assert error.data["retryable"] is True
    assert text_of(events) == "only token"


async def test_generation_nobody_subscribes_to_is_abandoned_after_grace(start_rill: StartRill) -> None:
    # A grace long enough for the request to reach the fake upstream on a busy machine:
    # a shorter one may end the answer before its request was even sent.
    rill = await start_rill(stream={"resume_grace": 1.0})
    rill.fake.script(Reply(chunks=[chunk("x")], end="hang"))
    generation_id = await rill.start_chat()
    await wait_for(lambda: len(rill.fake.requests) == 1)
    async with asyncio.timeout(4.0):
        await rill.fake.requests[0].closed.wait()
    assert rill.registry.live() == []
    generation = rill.registry.get(generation_id)
    assert generation is not None
    terminal = generation.terminal
    assert terminal is not None
    assert json.loads(terminal.data)["code"] == "abandoned"


async def test_reconnect_within_grace_keeps_the_same_upstream_request(start_rill: StartRill) -> None:
    rill = await start_rill(stream={"resume_grace": 1.0})
    rill.fake.script(Reply(chunks=answer(TOKENS, delay=0.03)))
    generation_id = await rill.start_chat()
    first = await rill.open_stream(generation_id)
    await first.read_until("delta")
    first.response.close()
    await asyncio.sleep(0.4)
    second = await rill.open_stream(generation_id, last_event_id=first.events[-1].id)
    await second.read_all()
    assert terminal(second.events).data == {"finish_reason": "stop"}
    assert text_of(first.events + second.events) == "".join(TOKENS)
    assert len(rill.fake.requests) == 1


async def _stalled_reader(rill: Rill, generation_id: str) -> socket.socket:
    """A client that asks for the stream and then never reads (tiny receive buffer)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    assert rill.url.port is not None
    await loop.sock_connect(sock, ("127.0.0.1", rill.url.port))
    request = f"GET /api/chat/{generation_id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    await loop.sock_sendall(sock, request.encode())
    return sock


async def test_slow_reader_does_not_hold_up_the_generation_or_other_readers(
    start_rill: StartRill, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="server.relay.streaming")
    rill = await start_rill(stream={"send_timeout": 0.5})
    big = ["x" * 8000 + str(i) for i in range(1500)]  # ~12 MB: more than loopback's socket buffers
    rill.fake.script(Reply(chunks=answer(big)))
    generation_id = await rill.start_chat()
    stalled = await _stalled_reader(rill, generation_id)
    try:
        await wait_for(lambda: len(rill.app[OPEN_STREAMS]) == 1)
        fast = await rill.open_stream(generation_id)
        events = await fast.read_all(timeout=10.0)
        assert text_of(events) == "".join(big)
        assert terminal(events).data == {"finish_reason": "stop"}
        generation = rill.registry.get(generation_id)
        assert generation is not None
        assert not generation.upstream_open  # the upstream finished while one reader stalled
        # The stalled reader is dropped once its writes block longer than send_timeout.
        await wait_for(lambda: len(rill.app[OPEN_STREAMS]) == 0, timeout=3.0)
        assert "closed a stalled reader" in caplog.text
    finally:
        stalled.close()
    # ...and it can come back and resume by id.
    resumed = await (await rill.open_stream(generation_id, last_event_id="100")).read_all()
    assert resumed[0].id == "101"
    assert terminal(resumed).data == {"finish_reason": "stop"}
    assert len(rill.fake.requests) == 1


async def test_heartbeat_comments_keep_idle_streams_alive(start_rill: StartRill) -> None:
    rill = await start_rill(stream={"heartbeat_interval": 0.2, "liveness_interval": 0.05})
    rill.fake.script(Reply(chunks=[b": keep-alive\n\n", chunk("a"), 0.3, b": keep-alive\n\n"], end="hang"))
    generation_id = await rill.start_chat()
    reader = await rill.open_stream(generation_id)
    await reader.read_until("delta")
    raw = b""
    loop = asyncio.get_running_loop()
    until = loop.time() + 0.9
    while loop.time() < until:
        try:
            async with asyncio.timeout(until - loop.time()):
                raw += await reader.response.content.readany()
        except TimeoutError:
            break
    # One comment per idle interval (0.9 s / 0.2 s), not one per monitor tick (0.05 s).
    assert 2 <= raw.count(b": hb\r\n") <= 6
    assert b": hb\r\n\r\n" not in raw  # a comment line only: a blank line would be an empty event to some clients
    assert b"keep-alive" not in reader.raw + raw  # upstream comments are understood, not relayed
    assert text_of(reader.events) == "a"


async def test_open_streams_keep_no_task_asleep_for_pings(rill: Rill) -> None:
    # Heartbeats come from the one monitor task; aiohttp-sse's own ping loop would keep
    # a task per stream asleep (memory for nothing).
    rill.fake.script(Reply(chunks=answer(["a", "b"], delay=0.3)))
    generation_id = await rill.start_chat()
    reader = await rill.open_stream(generation_id)
    await reader.read_until("delta")
    running = [getattr(task.get_coro(), "__qualname__", "") for task in asyncio.all_tasks()]
    assert not [name for name in running if name.endswith("._ping")]
    assert text_of(await reader.read_all()) == "ab"


async def test_an_ended_answer_does_not_keep_the_conversation(rill: Rill) -> None:
    """Kept for resumes for minutes, an answer holds its events, not the (up to
    hundreds of kilobytes of) conversation that was sent to the model."""
    long_question = "why " * 20_000
    generation_id = await rill.start_chat(messages=[{"role": "user", "content": long_question}])
    events = await (await rill.open_stream(generation_id)).read_all()
    assert terminal(events).data == {"finish_reason": "stop"}
    generation = rill.registry.get(generation_id)
    assert generation is not None
    await generation.wait_closed()
    assert generation.request.messages == ()
    assert rill.fake.requests[0].body["messages"][-1]["content"] == long_question  # sent whole


async def test_ended_generation_expires_after_ttl(start_rill: StartRill) -> None:
    rill = await start_rill(stream={"finished_ttl": 0.3, "liveness_interval": 0.05})
    client_id = str(uuid.uuid4())
    status, body = await rill.post_chat(messages=[{"role": "user", "content": "Hi"}], client_id=client_id)
    assert status == 201
    await (await rill.open_stream(body["id"])).read_all()
    await wait_for(lambda: rill.registry.get(body["id"]) is None, timeout=2.0)
    async with rill.session.get(rill.url / f"api/chat/{body['id']}/events") as response:
        assert response.status == 404
    status, again = await rill.post_chat(messages=[{"role": "user", "content": "Hi"}], client_id=client_id)
    assert status == 201
    assert again["id"] != body["id"]


async def test_answers_are_kept_deflated_and_replay_exactly(rill: Rill) -> None:
    rill.fake.script(Reply(chunks=answer(["the same words again "] * 200)))  # 4,200 characters
    generation_id = await rill.start_chat()
    live = await rill.open_stream(generation_id)
    await live.read_all()
    replay = await rill.open_stream(generation_id)
    await replay.read_all()
    tail = await rill.open_stream(generation_id, last_event_id="150")
    await tail.read_all()

    assert replay.raw == live.raw
    assert tail.raw.removeprefix(b"retry: 3000\r\n") == live.raw[live.raw.index(b"id: 151\r\n") :]
    generation = rill.registry.get(generation_id)
    assert generation is not None
    assert generation.size_bytes < 2500  # 5 bytes of bookkeeping per event, and the text deflated
    assert rill.registry.ended_bytes == generation.size_bytes


async def test_memory_cap_evicts_the_oldest_ended_generations_first(start_rill: StartRill) -> None:
    rill = await start_rill(stream={"buffer_memory_mb": 0.02, "resume_grace": 1.0})  # about 20 KB
    ids = []
    for _ in range(4):
        # Random text: an ended answer is kept deflated, about 7.5 KB each.
        rill.fake.script(Reply(chunks=answer([base64.b64encode(os.urandom(750)).decode() for _ in range(10)])))
        generation_id = await rill.start_chat()
        await (await rill.open_stream(generation_id)).read_all()
        ids.append(generation_id)
    # Just ended: still resumable, even over the cap.
    assert all(rill.registry.get(g) is not None for g in ids)
    # Once past the grace period, the oldest go until the rest fit under the cap.
    await wait_for(lambda: rill.registry.get(ids[0]) is None and rill.registry.get(ids[1]) is None, timeout=3.0)
    assert rill.registry.get(ids[2]) is not None
    assert rill.registry.get(ids[-1]) is not None
    assert rill.registry.ended_bytes <= rill.registry.max_bytes


async def test_live_answers_do_not_push_out_just_ended_ones(start_rill: StartRill) -> None:
    """A long live answer over the cap must not make every other answer unresumable."""
    rill = await start_rill(stream={"buffer_memory_mb": 0.01, "resume_grace": 5.0})
    text = [base64.b64encode(os.urandom(750)).decode() for _ in range(30)]  # random: deflates little
    rill.fake.script(Reply(chunks=[chunk(piece) for piece in text], end="hang"))
    await rill.start_chat(messages=[{"role": "user", "content": "long"}])
    await wait_for(lambda: rill.registry.live()[0].size_bytes > rill.registry.max_bytes)
    rill.fake.script(Reply(chunks=answer(["short"])))
    generation_id = await rill.start_chat()
    first = await (await rill.open_stream(generation_id)).read_all()
    again = await (await rill.open_stream(generation_id)).read_all()
    assert [e.data for e in again] == [e.data for e in first]


async def test_shutdown_ends_every_live_stream_and_closes_every_upstream(start_rill: StartRill) -> None:
    rill = await start_rill()
    for _ in range(3):
        rill.fake.script(Reply(chunks=[chunk("partial")], end="hang"))
    generation_ids = [await rill.start_chat(messages=[{"role": "user", "content": f"q{i}"}]) for i in range(3)]
    readers = [await rill.open_stream(g) for g in generation_ids for _ in range(2)]
    for reader in readers:
        await reader.read_until("delta")
    assert rill.fake.open == 3

    cleanup = asyncio.create_task(rill.runner.cleanup())  # what SIGTERM does under run_app
    for reader in readers:
        await reader.read_until("error", timeout=1.0)  # at once, not after shutdown_timeout
    await cleanup
    assert rill.app[SESSION].closed  # cleanup_ctx closed the one ClientSession

    for reader in readers:
        events = await reader.read_all()
        error = terminal(events)
        assert error.event == "error"
        assert error.data["code"] == "server_shutdown"
        assert error.data["retryable"] is True
        assert text_of(events) == "partial"
    await wait_for(lambda: rill.fake.open == 0, timeout=2.0)
    assert all(seen.closed.is_set() for seen in rill.fake.requests)


async def test_shutdown_closes_an_answer_still_settling_its_connection(start_rill: StartRill) -> None:
    """A complete answer whose upstream body stays open after [DONE] (Rill waits a
    moment for its end, to keep the connection) is closed at shutdown, not waited for."""
    rill = await start_rill()
    rill.fake.script(Reply(chunks=answer(["done"]), end="hang"))
    events = await (await rill.open_stream(await rill.start_chat())).read_all(timeout=2.0)
    assert terminal(events).data == {"finish_reason": "stop"}
    assert rill.fake.open == 1  # the body is still open: Rill is waiting for its end

    started = asyncio.get_running_loop().time()
    await rill.runner.cleanup()
    assert asyncio.get_running_loop().time() - started < 0.5  # not the settle wait, nor shutdown_timeout
    await wait_for(lambda: rill.fake.open == 0, timeout=2.0)


async def test_new_chats_are_refused_once_shutdown_begins(rill: Rill) -> None:
    async with rill.session.get(rill.url / "readyz") as response:
        assert (response.status, await response.json()) == (200, {"ready": True, "status": "ok"})
    await rill.app.shutdown()  # on_shutdown hooks; the site still listens in this test
    status, body = await rill.post_chat()
    assert status == 503
    assert body["error"]["code"] == "shutting_down"
    async with rill.session.get(rill.url / "healthz") as response:
        assert response.status == 200  # alive: still answering while it drains
        assert (await response.json())["status"] == "shutting_down"
    async with rill.session.get(rill.url / "readyz") as response:
        assert (response.status, await response.json()) == (503, {"ready": False, "status": "shutting_down"})
    await asyncio.sleep(0.05)
    assert rill.fake.requests == []


async def test_meta_event_is_first_and_json_is_single_line(rill: Rill) -> None:
    rill.fake.script(Reply(chunks=answer(["a\nb"])))
    generation_id = await rill.start_chat()
    reader = await rill.open_stream(generation_id)
    await reader.read_all()
    for block in reader.raw.split(b"\r\n\r\n"):
        data_lines = [line for line in block.split(b"\r\n") if line.startswith(b"data:")]
        assert len(data_lines) <= 1
        if data_lines:
            json.loads(data_lines[0][len(b"data: ") :])


async def test_clients_leaving_before_the_headers_are_not_logged_as_errors(
    rill: Rill, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    rill.fake.script(Reply(chunks=[chunk("x")], end="hang"))
    generation_id = await rill.start_chat()
    loop = asyncio.get_running_loop()
    assert rill.url.port is not None
    for _ in range(20):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", rill.url.port))
        request = f"GET /api/chat/{generation_id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        await loop.sock_sendall(sock, request.encode())
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
        sock.close()
    await wait_for(lambda: len(rill.app[OPEN_STREAMS]) == 0)
    await asyncio.sleep(0.2)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    status, _ = await rill.post_chat()
    assert status == 201  # and the server keeps serving


ABORT_STORM = 300


async def test_abort_storm_leaves_no_upstream_connection_open(start_rill: StartRill) -> None:
    # 300 readers vanish mid-answer (closed tabs): within resume_grace + 1 s nobody pays.
    # 2 s: all 300 connect at once now (the listen queue no longer drops the later ones for a
    # 1 s retry), so on a busy machine a stream can open more than 1 s after its POST.
    grace = 2.0
    rill = await start_rill(
        stream={"resume_grace": grace, "liveness_interval": 0.1},
        limits={"max_concurrent_per_client": ABORT_STORM, "max_concurrent_total": ABORT_STORM},
    )
    for _ in range(ABORT_STORM):
        rill.fake.script(Reply(chunks=[chunk("tok "), 0.05, chunk("tok "), 60.0], end="hang"))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        readers = await open_live_streams(session, rill.url, ABORT_STORM)
        assert rill.fake.open == ABORT_STORM

        loop = asyncio.get_running_loop()
        dropped = loop.time()
        for reader in readers:
            reader.response.close()
    await wait_for(lambda: rill.fake.open == 0, timeout=grace + 1.0)
    assert loop.time() - dropped >= grace * 0.9, "closed before the grace period a reload gets"
    assert all(seen.closed.is_set() for seen in rill.fake.requests)
    assert not rill.registry.live()
    assert len(rill.app[OPEN_STREAMS]) == 0
    async with rill.session.get(rill.url / "metrics") as response:
        text = await response.text()
    assert "rill_live_generations 0.0" in text
    assert "rill_subscribers 0.0" in text
    assert f'rill_cancellations_total{{reason="abandoned"}} {float(ABORT_STORM)}' in text
