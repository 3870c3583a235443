"""Shared mode: Rill apps sharing answers through a real redis-server. An answer started
on one is read, resumed and stopped on another; its events are the same bytes with the
same ids everywhere, and the model is asked once.

The contract tests (the `pair` fixture) run twice: the answer's owner and its reader in
one process (the default mode, no Redis used), and in two processes sharing Redis. What
a client sees must not tell the two apart."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from redis.asyncio import Redis

from server.cluster import names
from server.config import ConfigError
from server.keys import CLUSTER, CONFIG

from .conftest import RedisServer, Rill, StartRill, make_config, wait_for
from .fakes import FakeUpstream, Reply, StreamReader, answer, chunk, terminal, text_of

TOKENS = [f"tok{i} " for i in range(40)]
RETRIED = "6f1c2a0e-3b4d-4e5f-8a9b-0c1d2e3f4a5b"  # a client_id the client sends again
NO_STORAGE = {"enabled": False}


async def start_shared(start_rill: StartRill, redis_url: str, **sections: Any) -> Rill:
    return await start_rill(cluster={"redis_url": redis_url}, storage=NO_STORAGE, **sections)


Pair = tuple[Rill, Rill]


@pytest.fixture(params=["one process", "two processes"])
async def pair(request: pytest.FixtureRequest, start_rill: StartRill, redis_url: str) -> Pair:
    """(the process that starts answers, the process their reader asks)."""
    if request.param == "one process":
        alone = await start_rill(storage=NO_STORAGE)
        return alone, alone
    return await start_shared(start_rill, redis_url), await start_shared(start_rill, redis_url)


def raw_events(reader: StreamReader) -> list[bytes]:
    """The stream's event blocks as they came over the wire (the retry hint left out)."""
    blocks = reader.raw.replace(b"retry: 3000\r\n", b"").split(b"\r\n\r\n")
    return [block for block in blocks if block.startswith(b"id: ")]


async def test_an_answer_started_on_one_process_streams_on_another(pair: Pair, fake_upstream: FakeUpstream) -> None:
    fake_upstream.script(Reply(chunks=answer(TOKENS, delay=0.01)))
    a, b = pair

    generation_id = await a.start_chat()
    on_a = await a.open_stream(generation_id)
    on_b = await b.open_stream(generation_id)  # at once: B must already know of it
    events_a, events_b = await on_a.read_all(), await on_b.read_all()

    assert text_of(events_b) == "".join(TOKENS)
    assert terminal(events_b).data["finish_reason"] == "stop"
    assert [e.id for e in events_b] == [e.id for e in events_a]
    assert raw_events(on_b) == raw_events(on_a)  # the very bytes local readers get
    assert len(fake_upstream.requests) == 1
    if b is not a:
        assert b.registry.get(generation_id) is None  # B never asked the model


async def test_a_reader_cut_off_resumes_on_a_third_process_from_its_last_event_id(
    start_rill: StartRill, redis_url: str, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.script(Reply(chunks=answer(TOKENS, delay=0.02)))
    a, b, c = [await start_shared(start_rill, redis_url) for _ in range(3)]
    generation_id = await a.start_chat()

    on_b = await b.open_stream(generation_id)
    for _ in range(6):
        await on_b.read_until("delta")
    last_id = on_b.events[-1].id
    on_b.response.close()  # the connection drops mid-answer

    on_c = await c.open_stream(generation_id, last_event_id=last_id)
    rest = await on_c.read_all()
    assert int(rest[0].id) == int(last_id) + 1  # nothing again, nothing skipped
    assert text_of(on_b.events) + text_of(rest) == "".join(TOKENS)
    assert terminal(rest).event == "done"
    assert len(fake_upstream.requests) == 1


async def test_an_ended_answer_read_elsewhere_gives_204_past_its_end_and_400_past_its_last_event(pair: Pair) -> None:
    a, b = pair
    generation_id = await a.start_chat()
    events = await (await a.open_stream(generation_id)).read_all()
    last = events[-1].id

    url = b.url / f"api/chat/{generation_id}/events"
    async with b.session.get(url, headers={"Last-Event-ID": last}) as response:
        assert response.status == 204
    async with b.session.get(url, headers={"Last-Event-ID": str(int(last) + 1)}) as response:
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "bad_last_event_id"
    whole = await (await b.open_stream(generation_id)).read_all()
    assert [(e.id, e.event, e.data) for e in whole] == [(e.id, e.event, e.data) for e in events]


async def test_stop_sent_to_another_process_closes_the_owners_upstream_request(
    pair: Pair, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.script(Reply(chunks=[chunk("so far")], end="hang"))
    a, b = pair
    if CLUSTER in a.app:
        await wait_for(lambda: a.app[CLUSTER].control.listening.is_set())
    generation_id = await a.start_chat()
    on_a = await a.open_stream(generation_id)
    await on_a.read_until("delta")
    assert fake_upstream.open == 1

    loop = asyncio.get_running_loop()
    asked = loop.time()
    async with b.session.delete(b.url / f"api/chat/{generation_id}") as response:
        assert response.status == 200
        body = await response.json()
    assert body["id"] == generation_id
    assert body["ended"] == "done"
    assert body["result"] == {"finish_reason": "cancelled"}
    seen = fake_upstream.requests[0]
    await asyncio.wait_for(seen.closed.wait(), 2.0)
    assert seen.closed_at is not None
    assert seen.closed_at - asked < 1.0
    assert fake_upstream.open == 0
    assert terminal(await on_a.read_all()).data == {"finish_reason": "cancelled"}


async def test_an_answer_read_only_through_another_process_is_not_abandoned_as_unread(
    start_rill: StartRill, redis_url: str, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.script(Reply(chunks=answer(TOKENS, delay=0.05)))  # 2 s, four times the grace
    a = await start_shared(start_rill, redis_url, stream={"resume_grace": 0.5})
    b = await start_shared(start_rill, redis_url, stream={"resume_grace": 0.5})
    generation_id = await a.start_chat()
    events = await (await b.open_stream(generation_id)).read_all()
    assert text_of(events) == "".join(TOKENS)
    assert terminal(events).data["finish_reason"] == "stop"


async def test_an_answer_nobody_reads_on_any_process_is_still_abandoned(
    start_rill: StartRill, redis_url: str, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.script(Reply(chunks=[chunk("unread")], end="hang"))
    a = await start_shared(start_rill, redis_url, stream={"resume_grace": 0.5})
    b = await start_shared(start_rill, redis_url, stream={"resume_grace": 0.5})
    generation_id = await a.start_chat()
    on_b = await b.open_stream(generation_id)
    await on_b.read_until("delta")
    on_b.response.close()  # the only reader, on B, goes away
    seen = fake_upstream.requests[0]
    await asyncio.wait_for(seen.closed.wait(), 5.0)  # abandoned: the upstream request is closed
    events = await (await b.open_stream(generation_id)).read_all()
    assert terminal(events).data["code"] == "abandoned"
    assert text_of(events) == "unread"


async def test_a_client_id_sent_again_to_another_process_finds_the_first_answer(
    pair: Pair, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Reply(chunks=[chunk("first")], end="hang")
    a, b = pair
    status_a, body_a = await post(a, client_id=RETRIED)
    status_b, body_b = await post(b, client_id=RETRIED)
    assert (status_a, status_b) == (201, 200)
    assert body_b == body_a
    await asyncio.sleep(0.1)
    assert len(fake_upstream.requests) == 1


async def test_an_unknown_answer_is_404_on_every_process(pair: Pair) -> None:
    _, b = pair
    missing = "0" * 32
    async with b.session.get(b.url / f"api/chat/{missing}/events") as response:
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "generation_not_found"
    async with b.session.delete(b.url / f"api/chat/{missing}") as response:
        assert response.status == 404


async def test_another_tokens_answer_is_404_on_another_process(
    start_rill: StartRill, redis_url: str, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.script(Reply(chunks=[chunk("private")], end="hang"))
    environ = {"RILL_ACCESS_TOKENS": "alice:alice-secret-0123456789,bob:bob-secret-0123456789ab"}
    a = await start_shared(start_rill, redis_url, environ=environ)
    b = await start_shared(start_rill, redis_url, environ=environ)
    alice = {"Authorization": "Bearer alice-secret-0123456789"}
    bob = {"Authorization": "Bearer bob-secret-0123456789ab"}
    body = {"messages": [{"role": "user", "content": "Hi"}]}
    async with a.session.post(a.url / "api/chat", json=body, headers=alice) as response:
        assert response.status == 201, await response.text()
        generation_id = (await response.json())["id"]
    async with b.session.get(b.url / f"api/chat/{generation_id}/events", headers=bob) as response:
        assert response.status == 404
    async with b.session.delete(b.url / f"api/chat/{generation_id}", headers=bob) as response:
        assert response.status == 404
    assert fake_upstream.open == 1  # bob's Stop reached nothing
    reader = StreamReader(await b.session.get(b.url / f"api/chat/{generation_id}/events", headers=alice))
    assert (await reader.read_until("delta")).data["text"] == "private"
    reader.response.close()


async def test_a_tokens_events_reach_redis_in_a_few_pipelined_writes(
    start_rill: StartRill, redis_url: str, fake_upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    # 200 tokens in 4 network chunks: the mirror writes per loop turn, not per token.
    tokens = [f"t{i} " for i in range(200)]
    pieces = answer(tokens)
    per_chunk = len(pieces) // 4
    grouped: list[bytes | float] = []
    for start in range(0, len(pieces), per_chunk):
        grouped.extend([b"".join(p for p in pieces[start : start + per_chunk] if isinstance(p, bytes)), 0.05])
    fake_upstream.script(Reply(chunks=grouped))
    a = await start_shared(start_rill, redis_url)
    mirror = a.app[CLUSTER].mirror
    assert mirror._write_interval == a.app[CONFIG].cluster.write_interval
    writes = 0
    original = mirror._write

    async def counted(batch: Any) -> None:
        nonlocal writes
        writes += 1
        await original(batch)

    mirror._write = counted  # type: ignore[method-assign]
    generation_id = await a.start_chat()
    events = await (await a.open_stream(generation_id)).read_all()
    await mirror.flush()

    assert len(events) > 200
    assert writes <= 10
    client = Redis.from_url(redis_url)
    try:
        entries = cast(list[tuple[bytes, dict[bytes, bytes]]], await client.xrange(f"rill:events:{generation_id}"))
        feed = cast(list[tuple[bytes, dict[bytes, bytes]]], await client.xrange(f"rill:feed:{a.app[CLUSTER].process}"))
    finally:
        await client.aclose()
    assert len(entries) <= writes  # one entry per write: the events of a loop turn together
    stored = b"".join(fields[b"w"] for _, fields in entries)
    assert [event_id for event_id, _ in names.split(stored)] == [int(e.id) for e in events]  # each once, in order
    assert [int(entry_id.split(b"-")[1]) for entry_id, _ in entries] == [
        names.last_id(fields[b"w"]) for _, fields in entries
    ]  # an entry's id is its last event's
    assert b"t" in entries[-1][1]  # the last entry holds the answer's end
    # The process's feed has the same writes, for readers elsewhere to follow them all at once.
    assert b"".join(fields[generation_id.encode()] for _, fields in feed) == stored
    assert feed[-1][1][b"t"] == generation_id.encode()
    assert [int(entry_id.split(b"-")[1]) for entry_id, _ in feed] == list(range(1, len(feed) + 1))
    ttl = int(redis_server.command("TTL", f"rill:events:{generation_id}").strip(b":\r\n"))
    assert 0 < ttl <= 60  # finished_ttl in the tests' config: gone after it, like the local copy


async def test_readers_joining_another_processes_answer_at_any_moment_get_every_event_once_in_order(
    start_rill: StartRill, redis_url: str, fake_upstream: FakeUpstream
) -> None:
    # Readers join from the start and from their Last-Event-ID while the owner writes: the
    # catch-up from the answer's stream and the owner's feed must meet without a gap.
    tokens = [f"j{i} " for i in range(120)]
    fake_upstream.script(Reply(chunks=answer(tokens, delay=0.005)))
    a, b = [await start_shared(start_rill, redis_url) for _ in range(2)]
    generation_id = await a.start_chat()

    async def join(after: int, wait: float) -> list[Any]:
        await asyncio.sleep(wait)
        on_b = await b.open_stream(generation_id, last_event_id=str(after) if after else None)
        return await on_b.read_all()

    plan = [(0, 0.0), (0, 0.1), (3, 0.2), (0, 0.3), (10, 0.35), (0, 0.5)]  # (Last-Event-ID, when)
    owners_reader = await a.open_stream(generation_id)
    *readers, owners = await asyncio.gather(*(join(after, wait) for after, wait in plan), owners_reader.read_all())
    expected = [(e.id, e.data) for e in owners]
    for (after, _), events in zip(plan, readers, strict=True):
        assert [(e.id, e.data) for e in events] == expected[after:]
    assert text_of(owners) == "".join(tokens)


async def test_a_reader_whose_catch_up_answer_is_slow_misses_nothing_written_meanwhile(
    start_rill: StartRill, redis_url: str, fake_upstream: FakeUpstream
) -> None:
    # The catch-up's reply reaches the reader's process late, while the owner goes on
    # writing and that process reads its feed: what the feed brings meanwhile is kept.
    tokens = [f"s{i} " for i in range(80)]
    fake_upstream.script(Reply(chunks=answer(tokens, delay=0.005)))
    a, b = [await start_shared(start_rill, redis_url) for _ in range(2)]
    hub = b.app[CLUSTER].hub
    generation_id = await a.start_chat()
    await (await b.open_stream(generation_id)).read_until("delta")  # B reads A's feed now

    redis = hub._redis
    slow = 0

    class SlowTransactions:
        def __getattr__(self, name: str) -> Any:
            return getattr(redis, name)

        def pipeline(self, transaction: bool = True) -> Any:
            pipe = redis.pipeline(transaction=transaction)
            if transaction:
                execute = pipe.execute

                async def late(*args: Any, **kwargs: Any) -> Any:
                    nonlocal slow
                    result = await execute(*args, **kwargs)
                    slow += 1
                    await asyncio.sleep(0.1)  # meanwhile A writes, and B's hub reads it
                    return result

                pipe.execute = late  # type: ignore[method-assign]
            return pipe

    hub._redis = SlowTransactions()  # type: ignore[assignment]
    try:
        events = await (await b.open_stream(generation_id)).read_all()
    finally:
        hub._redis = redis
    assert slow >= 1
    assert [int(e.id) for e in events] == list(range(1, len(events) + 1))
    assert text_of(events) == "".join(tokens)


async def test_a_write_missing_from_the_owners_feed_is_read_from_the_answers_stream(
    start_rill: StartRill, redis_url: str, fake_upstream: FakeUpstream
) -> None:
    # One of the owner's writes never reaches its feed (as one lost with a failed write):
    # a reader on the other process sees the gap in the feed's numbers and takes those
    # events from the answer's own stream, once each, in order.
    tokens = [f"g{i} " for i in range(60)]
    fake_upstream.script(Reply(chunks=answer(tokens, delay=0.01)))
    a, b = [await start_shared(start_rill, redis_url) for _ in range(2)]
    mirror = a.app[CLUSTER].mirror
    generation_id = await a.start_chat()
    on_b = await b.open_stream(generation_id)
    for _ in range(5):
        await on_b.read_until("delta")

    original = mirror._append_events
    diverted = 0

    async def one_write_elsewhere(pipe: Any, batch: Any) -> None:
        nonlocal diverted
        if diverted or not any(events for events in batch.values()):
            await original(pipe, batch)
            return
        feed, mirror._feed = mirror._feed, "rill:feed:lost"  # the answer's stream still gets it
        try:
            await original(pipe, batch)
        finally:
            mirror._feed = feed
        diverted += 1

    mirror._append_events = one_write_elsewhere  # type: ignore[method-assign]
    rest = await on_b.read_all()
    assert diverted == 1
    events = on_b.events
    assert [int(e.id) for e in events] == list(range(1, len(events) + 1))  # nothing twice, nothing skipped
    assert text_of(events) == "".join(tokens)
    assert rest[-1].event == "done"


def test_the_redis_url_comes_from_the_file_or_rill_redis_url_and_is_checked(fake_upstream: FakeUpstream) -> None:
    assert not make_config("http://127.0.0.1:9/v1").cluster.enabled
    config = make_config("http://127.0.0.1:9/v1", cluster={"redis_url": "redis://:pw-secret-9@127.0.0.1:6390/1"})
    assert config.cluster.enabled
    assert "pw-secret-9" not in config.cluster.shown_url
    assert "pw-secret-9" not in repr(config)
    assert "pw-secret-9" in config.secrets  # scrubbed from anything logged
    environ = {"RILL_REDIS_URL": "redis://127.0.0.1:7000/0"}
    from_env = make_config("http://127.0.0.1:9/v1", environ=environ, cluster={"redis_url": "redis://elsewhere:1/0"})
    assert from_env.cluster.redis_url == "redis://127.0.0.1:7000/0"
    assert from_env.cluster.url_from == "RILL_REDIS_URL"
    for bad in ("127.0.0.1:6379", "http://127.0.0.1:6379", "postgresql://x@y/z"):
        with pytest.raises(ConfigError, match="redis_url"):
            make_config("http://127.0.0.1:9/v1", cluster={"redis_url": bad})
    with pytest.raises(ConfigError, match=r"cluster\.nodes"):
        make_config("http://127.0.0.1:9/v1", cluster={"nodes": 2})
    # How often an owner writes to Redis: CPU traded for readers elsewhere's latency.
    assert config.cluster.write_interval == 0.01
    slower = make_config("http://127.0.0.1:9/v1", cluster={"redis_url": "redis://h:1/0", "write_interval": 0.02})
    assert slower.cluster.write_interval == 0.02
    for bad_interval in (0, -1, 0.5, "fast"):
        with pytest.raises(ConfigError, match=r"cluster\.write_interval"):
            make_config("http://127.0.0.1:9/v1", cluster={"write_interval": bad_interval})


async def post(rill: Rill, **fields: Any) -> tuple[int, Any]:
    return await rill.post_chat(**fields)


async def test_the_same_client_id_sent_to_two_processes_at_once_asks_the_model_once(
    start_rill: StartRill, redis_url: str, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Reply(chunks=[chunk("once")], end="hang")
    a = await start_shared(start_rill, redis_url)
    b = await start_shared(start_rill, redis_url)
    (status_a, body_a), (status_b, body_b) = await asyncio.gather(
        post(a, client_id=RETRIED), post(b, client_id=RETRIED)
    )
    assert sorted([status_a, status_b]) == [200, 201]
    assert body_a["id"] == body_b["id"]
    assert body_a["events"] == body_b["events"]
    assert body_a["model"] == body_b["model"] == "fake-chat"
    await wait_for(lambda: len(fake_upstream.requests) >= 1)
    await asyncio.sleep(0.2)
    assert len(fake_upstream.requests) == 1
    # The same client_id for a different request is refused on any process.
    status, body = await post(b, client_id=RETRIED, messages=[{"role": "user", "content": "other"}])
    assert status == 409
    assert body["error"]["code"] == "client_id_reused"
    reader = await b.open_stream(body_a["id"])
    assert (await reader.read_until("delta")).data["text"] == "once"


async def test_a_stored_conversations_message_sent_to_two_processes_at_once_asks_the_model_once(
    start_rill: StartRill, redis_url: str, fake_upstream: FakeUpstream, tmp_path: Any
) -> None:
    # The phone retries its message through the other process while the first try is
    # still on its way: one question, one answer, one upstream request, and both
    # responses name that answer.
    fake_upstream.default = Reply(chunks=[chunk("stored once")], end="hang")
    storage = {"url": f"sqlite:///{tmp_path}/shared.db", "auto_titles": False}
    a = await start_rill(cluster={"redis_url": redis_url}, storage=storage)
    b = await start_rill(cluster={"redis_url": redis_url}, storage=storage)
    async with a.session.post(a.url / "api/conversations", json={"title": "Retried"}) as response:
        assert response.status == 201, await response.text()
        cid = (await response.json())["id"]
    message = {"content": "hello once", "model": "fake-chat", "client_id": RETRIED}

    async def send(rill: Rill) -> tuple[int, dict[str, Any]]:
        async with rill.session.post(rill.url / f"api/conversations/{cid}/messages", json=message) as response:
            return response.status, await response.json()

    (status_a, body_a), (status_b, body_b) = await asyncio.gather(send(a), send(b))
    assert sorted([status_a, status_b]) in ([200, 201], [201, 201]), (body_a, body_b)
    assert body_a["answer"]["id"] == body_b["answer"]["id"]
    assert body_a["generation"]["id"] == body_b["generation"]["id"]
    await wait_for(lambda: len(fake_upstream.requests) >= 1)
    await asyncio.sleep(0.2)
    assert len(fake_upstream.requests) == 1
    async with b.session.get(b.url / f"api/conversations/{cid}") as response:
        stored = await response.json()
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant"]
    reader = await a.open_stream(body_b["generation"]["id"])
    assert (await reader.read_until("delta")).data["text"] == "stored once"


async def test_a_clients_streaming_answers_are_limited_over_every_process(
    start_rill: StartRill, redis_url: str, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Reply(chunks=[chunk("x")], end="hang")
    limits = {"max_concurrent_per_client": 3, "generations_per_minute": 10_000}
    a = await start_shared(start_rill, redis_url, limits=limits)
    b = await start_shared(start_rill, redis_url, limits=limits)
    # Ten at once, spread over both: exactly three get through.
    results = await asyncio.gather(*(post(a if i % 2 else b) for i in range(10)))
    statuses = sorted(status for status, _ in results)
    assert statuses == [201] * 3 + [429] * 7
    assert {body["error"]["code"] for status, body in results if status == 429} == {"too_many_generations"}
    started = [body["id"] for status, body in results if status == 201]
    await wait_for(lambda: fake_upstream.open == 3)
    # One stopped (on whichever process): room for exactly one more, on the other one.
    async with a.session.delete(a.url / f"api/chat/{started[0]}") as response:
        assert response.status == 200
    status, _ = await post(b)
    assert status == 201
    status, body = await post(a)
    assert status == 429
    assert body["error"]["code"] == "too_many_generations"


async def test_a_process_that_died_stops_counting_against_the_limits(
    start_rill: StartRill, redis_url: str, fake_upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    fake_upstream.default = Reply(chunks=[chunk("x")], end="hang")
    limits = {"max_concurrent_per_client": 1, "generations_per_minute": 10_000}
    a = await start_shared(start_rill, redis_url, limits=limits)
    b = await start_shared(start_rill, redis_url, limits=limits)
    assert (await post(a))[0] == 201
    assert (await post(b))[0] == 429
    a.app[CLUSTER].beat._task.cancel()  # type: ignore[union-attr]  # A stops renewing: as if killed
    redis_server.command("DEL", f"rill:process:{a.app[CLUSTER].process}")  # its key expired
    assert (await post(b))[0] == 201


async def test_answers_started_per_minute_are_limited_over_every_process(
    start_rill: StartRill, redis_url: str, fake_upstream: FakeUpstream
) -> None:
    limits = {"generations_per_minute": 3}
    a = await start_shared(start_rill, redis_url, limits=limits)
    b = await start_shared(start_rill, redis_url, limits=limits)
    assert [(await post(rill))[0] for rill in (a, b, a)] == [201, 201, 201]
    async with b.session.post(b.url / "api/chat", json={"messages": [{"role": "user", "content": "4th"}]}) as response:
        assert response.status == 429
        assert (await response.json())["error"]["code"] == "rate_limited"
        assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert len(fake_upstream.requests) == 3


async def test_redis_restarted_mid_answer_the_answer_streams_on_and_is_whole_elsewhere_afterwards(
    start_rill: StartRill, redis_url: str, fake_upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    tokens = [f"r{i} " for i in range(60)]
    fake_upstream.script(Reply(chunks=answer(tokens, delay=0.04)))  # 2.4 s
    a = await start_shared(start_rill, redis_url)
    b = await start_shared(start_rill, redis_url)
    generation_id = await a.start_chat()
    on_a = await a.open_stream(generation_id)
    for _ in range(3):
        await on_a.read_until("delta")

    redis_server.stop()  # and with it everything it held: it keeps nothing on disk
    for _ in range(5):
        await on_a.read_until("delta")  # the owner's readers go on as if nothing happened
    url = b.url / f"api/chat/{generation_id}"
    async with b.session.get(url / "events") as response:
        assert response.status == 503
        assert (await response.json())["error"]["code"] == "cluster_unavailable"
        assert response.headers["Retry-After"] == "2"
    async with b.session.delete(url) as response:
        assert response.status == 503

    redis_server.start()
    events_a = await on_a.read_all()
    assert text_of(events_a) == "".join(tokens)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while True:  # the owner writes the whole answer again once Redis is back
        async with b.session.get(url / "events") as response:
            if response.status == 200:
                on_b = StreamReader(response)
                await on_b.read_all()
                break
        assert loop.time() < deadline, "the answer never reached Redis again"
        await asyncio.sleep(0.2)
    assert raw_events(on_b) == raw_events(on_a)
    assert len(fake_upstream.requests) == 1


async def test_redis_down_for_good_is_one_error_line_a_minute_not_one_a_token(
    start_rill: StartRill,
    redis_url: str,
    fake_upstream: FakeUpstream,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    tokens = [f"d{i} " for i in range(100)]
    fake_upstream.script(Reply(chunks=answer(tokens, delay=0.015)))
    a = await start_shared(start_rill, redis_url)
    redis_server.stop()
    caplog.set_level("WARNING")
    loop = asyncio.get_running_loop()
    asked = loop.time()
    generation_id = await a.start_chat()  # Redis cannot hear of it: started all the same
    assert loop.time() - asked < 1.0  # and without waiting for it
    events = await (await a.open_stream(generation_id)).read_all()
    assert text_of(events) == "".join(tokens)
    errors = [r for r in caplog.records if r.levelname == "ERROR" and r.name.startswith("server.cluster")]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert "Redis write failed" in errors[0].getMessage()


async def test_a_session_signed_out_on_one_process_is_refused_on_every_process(
    start_rill: StartRill, redis_url: str
) -> None:
    environ = {"RILL_ACCESS_TOKENS": "alice:alice-secret-0123456789"}
    a = await start_shared(start_rill, redis_url, environ=environ)
    b = await start_shared(start_rill, redis_url, environ=environ)
    async with a.session.post(a.url / "api/session", json={"token": "alice-secret-0123456789"}) as response:
        assert response.status == 200
        cookie = response.cookies["rill_session"].value
    headers = {"Cookie": f"rill_session={cookie}"}

    async def signed_in(rill: Rill) -> bool:
        async with rill.session.get(rill.url / "api/session", headers=headers) as response:
            return bool((await response.json())["signed_in"])

    assert await signed_in(b)  # one cookie, good on every process
    async with a.session.delete(a.url / "api/session", headers=headers) as response:
        assert response.status == 200
    async with asyncio.timeout(5):
        while await signed_in(b):  # B hears of it in milliseconds
            await asyncio.sleep(0.02)
    c = await start_shared(start_rill, redis_url, environ=environ)  # started after the sign-out
    assert not await signed_in(c)
    assert not await signed_in(a)


ALICE = {"Authorization": "Bearer alice-secret-0123456789"}
BOB = {"Authorization": "Bearer bob-secret-0123456789ab"}
ACCESS_TOKENS = {"RILL_ACCESS_TOKENS": "alice:alice-secret-0123456789,bob:bob-secret-0123456789ab"}


async def post_as(rill: Rill, token: dict[str, str], **options: Any) -> tuple[int, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "Hi"}]}
    if options:
        body["options"] = options
    async with rill.session.post(rill.url / "api/chat", json=body, headers=token) as response:
        return response.status, await response.json()


async def test_the_daily_budget_is_one_ledger_over_every_process(
    start_rill: StartRill, redis_url: str, fake_upstream: FakeUpstream
) -> None:
    # Each fake answer is billed 10 tokens (its usage chunk); "Hi" is about 1.
    budget = {"daily_token_budget": 15}
    a = await start_shared(start_rill, redis_url, environ=ACCESS_TOKENS, access=budget)
    b = await start_shared(start_rill, redis_url, environ=ACCESS_TOKENS, access=budget)
    for rill, cap in ((a, 14), (b, 4)):  # what is left after the other process's answer
        status, body = await post_as(rill, ALICE)
        assert status == 201, body
        reader = StreamReader(await rill.session.get(rill.url / f"api/chat/{body['id']}/events", headers=ALICE))
        assert terminal(await reader.read_all()).event == "done"
        assert fake_upstream.requests[-1].body["max_tokens"] == cap
        await rill.app[CLUSTER].budget.flush()  # charged a moment after the end: this test asks at once
    status, body = await post_as(a, ALICE)
    assert (status, body["error"]["code"]) == (429, "budget_exhausted")
    assert (await post_as(b, BOB))[0] == 201  # Bob has his own
    assert len(fake_upstream.requests) == 3


async def test_answers_running_at_once_on_two_processes_cannot_pass_the_budget(
    start_rill: StartRill, redis_url: str, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Reply(chunks=[chunk("live")], end="hang")
    budget = {"daily_token_budget": 100}
    a = await start_shared(start_rill, redis_url, environ=ACCESS_TOKENS, access=budget)
    b = await start_shared(start_rill, redis_url, environ=ACCESS_TOKENS, access=budget)
    assert (await post_as(a, ALICE, max_tokens=60))[0] == 201  # holds 1 + 60
    status, _ = await post_as(b, ALICE)
    assert status == 201
    await wait_for(lambda: len(fake_upstream.requests) == 2)
    assert fake_upstream.requests[-1].body["max_tokens"] == 100 - 61 - 1  # the rest, less its prompt
    status, body = await post_as(a, ALICE)
    assert (status, body["error"]["code"]) == (429, "budget_exhausted")
    assert "running" in body["error"]["message"]
    # Ten at once over both processes: together they never hold more than the budget
    # (41 + 41, then the 18 left for a third, capped), and the rest are refused.
    before = len(fake_upstream.requests)
    results = await asyncio.gather(*(post_as(a if i % 2 else b, BOB, max_tokens=40) for i in range(10)))
    assert [status for status, _ in results].count(201) == 3
    await wait_for(lambda: len(fake_upstream.requests) == before + 3)
    caps = sorted(seen.body["max_tokens"] for seen in fake_upstream.requests[before:])
    assert caps == [17, 40, 40]  # each plus its 1-token prompt: 100


async def test_with_redis_down_a_budgeted_answer_is_refused_retryably_not_left_unchecked(
    start_rill: StartRill, redis_url: str, fake_upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    a = await start_shared(start_rill, redis_url, environ=ACCESS_TOKENS, access={"daily_token_budget": 1000})
    redis_server.stop()
    async with a.session.post(
        a.url / "api/chat", json={"messages": [{"role": "user", "content": "Hi"}]}, headers=ALICE
    ) as response:
        assert response.status == 503
        assert (await response.json())["error"]["code"] == "budget_unavailable"
        assert response.headers["Retry-After"] == "2"
    assert fake_upstream.requests == []


async def test_wrong_access_tokens_are_counted_over_every_process_at_once(
    start_rill: StartRill, redis_url: str, fake_upstream: FakeUpstream
) -> None:
    access = {"failed_sign_ins_per_minute": 5}
    a = await start_shared(start_rill, redis_url, environ=ACCESS_TOKENS, access=access)
    b = await start_shared(start_rill, redis_url, environ=ACCESS_TOKENS, access=access)
    wrong = {"Authorization": "Bearer not-the-token-0123456789"}

    async def guess(rill: Rill) -> int:
        async with rill.session.get(rill.url / "api/models", headers=wrong) as response:
            return response.status

    statuses = await asyncio.gather(*(guess(a if i % 2 else b) for i in range(16)))
    assert sorted(statuses) == [401] * 5 + [429] * 11  # five guesses in all, not five each
    for rill in (a, b):  # locked out everywhere, the right token too
        async with rill.session.get(rill.url / "api/models", headers=ALICE) as response:
            assert response.status == 429
            assert (await response.json())["error"]["code"] == "too_many_attempts"
            assert 1 <= int(response.headers["Retry-After"]) <= 60


async def test_a_change_made_through_one_process_reaches_a_page_following_another(
    start_rill: StartRill, redis_url: str, fake_upstream: FakeUpstream, tmp_path: Any
) -> None:
    storage = {"url": f"sqlite:///{tmp_path}/shared.db", "auto_titles": False}
    a = await start_rill(cluster={"redis_url": redis_url}, storage=storage)
    b = await start_rill(cluster={"redis_url": redis_url}, storage=storage)
    feed = StreamReader(await b.session.get(b.url / "api/changes"))  # the phone's sidebar, on B
    await asyncio.sleep(0.1)
    async with a.session.post(a.url / "api/conversations", json={"title": "From the laptop"}) as response:
        assert response.status == 201, await response.text()
        made = await response.json()
    event = await feed.next_event(timeout=1.0)
    assert event is not None
    assert event.event == "conversation"
    assert (event.data["id"], event.data["title"]) == (made["id"], "From the laptop")
    async with a.session.patch(a.url / f"api/conversations/{made['id']}", json={"title": "Renamed"}) as response:
        assert response.status == 200
    renamed = await feed.next_event(timeout=1.0)
    assert renamed is not None
    assert renamed.data["title"] == "Renamed"
    feed.response.close()
