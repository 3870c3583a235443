"""The main API path: POST a chat, read its events, replay, stop, models, health."""

from __future__ import annotations

import asyncio
import json
import uuid

from yarl import URL

from .conftest import Rill, StartRill, wait_for
from .fakes import USAGE, Chunk, FakeUpstream, Reply, answer, chunk, terminal, text_of

MULTILINE = "第一行 line one\nline two 🎉\r\n\n  indented 👩‍💻\rend"


async def test_answer_streams_meta_deltas_usage_done(rill: Rill) -> None:
    rill.fake.script(Reply(chunks=answer(["Hel", "lo", " 世界", " 🌍"])))
    generation_id = await rill.start_chat()
    events = await (await rill.open_stream(generation_id)).read_all()

    assert [e.event for e in events] == ["meta", "delta", "delta", "delta", "delta", "usage", "done"]
    assert [e.id for e in events] == [str(i) for i in range(1, 8)]
    meta = events[0].data
    assert meta["model"] == "fake-chat"
    assert meta["provider"] == "fake"
    assert meta["demo"] is False
    assert text_of(events) == "Hello 世界 🌍"
    assert events[-2].data == USAGE
    assert terminal(events).data == {"finish_reason": "stop"}


async def test_exact_bytes_on_the_wire_for_multiline_cjk_emoji(rill: Rill) -> None:
    rill.fake.script(Reply(chunks=answer([MULTILINE], usage=None)))
    generation_id = await rill.start_chat()
    reader = await rill.open_stream(generation_id)
    await reader.read_all()

    expected_delta = (
        'id: 2\r\nevent: delta\r\ndata: {"text":"第一行 line one\\nline two 🎉\\r\\n\\n  indented 👩‍💻\\rend"}\r\n\r\n'
    ).encode()
    assert reader.raw.startswith(b"retry: 3000\r\nid: 1\r\nevent: meta\r\ndata: {")
    assert expected_delta in reader.raw
    assert reader.raw.endswith(b'id: 3\r\nevent: done\r\ndata: {"finish_reason":"stop"}\r\n\r\n')
    assert text_of(reader.events) == MULTILINE


async def test_replays_and_resumes_are_byte_identical_to_the_live_stream(rill: Rill) -> None:
    # The buffer keeps a text event as its JSON string literal and rebuilds its wire bytes
    # for a reader catching up: exactly the bytes live readers were pushed.
    lone_surrogate = b'data: {"choices":[{"index":0,"delta":{"content":"smile \\ud83d"}}]}\n\n'
    chunks = answer(["a", MULTILINE, ' "quoted" \\ ', "\u2028"], reasoning=["Let me\n", "think 🤔"], delay=0.02)
    chunks.insert(-3, lone_surrogate)
    rill.fake.script(Reply(chunks=chunks))
    generation_id = await rill.start_chat(model="fake-reasoner")
    live = await rill.open_stream(generation_id)
    dropped = await rill.open_stream(generation_id)
    for name in ("reasoning", "reasoning", "delta", "delta"):
        await dropped.read_until(name)
    dropped.response.close()  # the network drops
    resumed = await rill.open_stream(generation_id, last_event_id=dropped.events[-1].id)  # still live
    await live.read_all()
    await resumed.read_all()
    replay = await rill.open_stream(generation_id)  # after the end
    await replay.read_all()
    tail = await rill.open_stream(generation_id, last_event_id="3")
    await tail.read_all()

    hint = b"retry: 3000\r\n"
    events = live.raw.removeprefix(hint)
    assert b'data: {"text":"smile \\ud83d"}' in events
    assert replay.raw == live.raw
    assert tail.raw == hint + events[events.index(b"id: 4\r\n") :]
    complete = dropped.raw[: dropped.raw.rindex(b"\r\n\r\n") + 4]  # its last event may be cut
    assert complete + resumed.raw.removeprefix(hint) == live.raw
    generation = rill.registry.get(generation_id)
    assert generation is not None
    assert generation.size_bytes < len(events)  # text is kept compactly


async def test_resumes_from_any_id_across_the_deflated_pieces_of_the_buffer(rill: Rill) -> None:
    # About 10 KB of text: the buffer deflates it in pieces as it fills. Readers resume from
    # ids in every piece, while the answer is live (pieces and the one being filled) and
    # after it has ended (all deflated), and get exactly the bytes live readers got.
    tokens = [f'{i:03d} {"é" * (i % 7)}\n{"x" * (i % 80)} "q\\ ' + "🎉" * (i % 3) for i in range(160)]
    chunks: list[Chunk] = [chunk(token) for token in tokens[:150]]
    rill.fake.script(Reply(chunks=[*chunks, 0.5, *answer(tokens[150:])]))  # a pause while the answer is live
    generation_id = await rill.start_chat()
    live = await rill.open_stream(generation_id)
    while len(live.events) < 140:
        await live.next_event()
    during = [await rill.open_stream(generation_id, last_event_id=str(i)) for i in range(1, 140, 9)]
    await live.read_all()
    for reader in during:
        await reader.read_all()
    after = [await rill.open_stream(generation_id, last_event_id=str(i)) for i in range(4, 160, 11)]
    for reader in after:
        await reader.read_all()

    assert text_of(live.events) == "".join(tokens)
    generation = rill.registry.get(generation_id)
    assert generation is not None
    assert len(generation._pieces) >= 2
    for reader in during + after:
        tail = live.raw[live.raw.index(f"id: {reader.events[0].id}\r\n".encode()) :]
        assert reader.raw.removeprefix(b"retry: 3000\r\n") == tail


async def test_emoji_split_into_escaped_surrogate_halves_arrives_whole(rill: Rill) -> None:
    # Some APIs cut a token between the two halves of an escaped UTF-16 pair. Neither half
    # is UTF-8 on its own: each is relayed escaped, and the browser's text joins them.
    halves = [b'data: {"choices":[{"index":0,"delta":{"content":"smile \\ud83d"}}]}\n\n']
    halves.append(b'data: {"choices":[{"index":0,"delta":{"content":"\\ude00!"}}]}\n\n')
    rill.fake.script(Reply(chunks=[*halves, *answer([], usage=None)]))
    generation_id = await rill.start_chat()
    reader = await rill.open_stream(generation_id)
    events = await reader.read_all()

    assert b'data: {"text":"smile \\ud83d"}' in reader.raw
    assert terminal(events).data == {"finish_reason": "stop"}
    assert text_of(events).encode("utf-16", "surrogatepass").decode("utf-16") == "smile 😀!"


async def test_request_sent_upstream(rill: Rill) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    status, _ = await rill.post_chat(
        {"messages": messages, "model": "fake-chat", "options": {"temperature": 0.3, "max_tokens": 50}}
    )
    assert status == 201
    await wait_for(lambda: len(rill.fake.requests) == 1)
    seen = rill.fake.requests[0]
    assert seen.body == {
        "model": "fake-model",
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "thinking": {"type": "disabled"},
        "temperature": 0.3,
        "max_tokens": 50,
    }
    assert seen.headers["Authorization"].startswith("Bearer ")
    assert seen.headers["Accept"] == "text/event-stream"


async def test_a_cookie_the_model_api_sets_is_never_sent_back(
    start_rill: StartRill, fake_upstream: FakeUpstream
) -> None:
    """One client session serves every user: a cookie set on one answer's response must
    not go out with the next request, which may be someone else's. (By a host name: a jar
    keeps no cookie from an IP address.)"""
    rill = await start_rill(upstream_url=fake_upstream.url.replace("127.0.0.1", "localhost"))
    rill.fake.script(Reply(chunks=answer(["one"]), headers={"Set-Cookie": "session=alice; Path=/"}))
    for _ in range(2):
        generation_id = await rill.start_chat()
        assert text_of(await (await rill.open_stream(generation_id)).read_all()) in ("one", "Hello world")
    assert len(rill.fake.requests) == 2
    assert "Cookie" not in rill.fake.requests[1].headers


async def test_reasoning_streams_before_the_answer(rill: Rill) -> None:
    rill.fake.script(Reply(chunks=answer(["42"], reasoning=["Let me", " think"])))
    generation_id = await rill.start_chat(model="fake-reasoner")
    events = await (await rill.open_stream(generation_id)).read_all()
    assert events[0].data["reasoning"] is True
    assert [e.event for e in events][:4] == ["meta", "reasoning", "reasoning", "delta"]
    assert text_of(events, "reasoning") == "Let me think"
    assert text_of(events) == "42"


async def test_reasoning_field_named_reasoning_is_understood(rill: Rill) -> None:
    """vLLM and Ollama call it `reasoning`, DeepSeek `reasoning_content`."""
    body = {"choices": [{"index": 0, "delta": {"reasoning": "hmm"}, "finish_reason": None}]}
    chunks = [f"data: {json.dumps(body)}\n\n".encode(), *answer(["ok"])]
    rill.fake.script(Reply(chunks=chunks))
    generation_id = await rill.start_chat()
    events = await (await rill.open_stream(generation_id)).read_all()
    assert text_of(events, "reasoning") == "hmm"
    assert text_of(events) == "ok"


async def test_post_answers_before_the_upstream_does(rill: Rill) -> None:
    """POST returns at once; the upstream request starts at POST time, not at subscribe."""
    rill.fake.script(Reply(chunks=[5.0], end="hang"))
    loop = asyncio.get_running_loop()
    started = loop.time()
    generation_id = await rill.start_chat()
    assert loop.time() - started < 1.0
    await wait_for(lambda: len(rill.fake.requests) == 1)  # nobody has subscribed yet
    generation = rill.registry.get(generation_id)
    assert generation is not None
    assert generation.live


async def test_same_client_id_returns_same_generation_without_second_request(rill: Rill) -> None:
    rill.fake.script(Reply(chunks=answer(["one"], delay=0.05)))
    client_id = str(uuid.uuid4())
    body = {"messages": [{"role": "user", "content": "Hi"}], "client_id": client_id}
    first_status, first = await rill.post_chat(body)
    second_status, second = await rill.post_chat(body)
    assert (first_status, second_status) == (201, 200)
    assert first == second
    events = await (await rill.open_stream(first["id"])).read_all()
    assert text_of(events) == "one"
    third_status, third = await rill.post_chat(body)  # after the end, too
    assert (third_status, third["id"]) == (200, first["id"])
    assert len(rill.fake.requests) == 1


async def test_client_id_reused_for_other_content_is_refused(rill: Rill) -> None:
    client_id = str(uuid.uuid4())
    await rill.post_chat({"messages": [{"role": "user", "content": "A"}], "client_id": client_id})
    status, body = await rill.post_chat({"messages": [{"role": "user", "content": "B"}], "client_id": client_id})
    assert status == 409
    assert body["error"]["code"] == "client_id_reused"
    await wait_for(lambda: len(rill.fake.requests) == 1)
    await asyncio.sleep(0.1)
    assert len(rill.fake.requests) == 1


async def test_ended_generation_replays_then_204_after_terminal(rill: Rill) -> None:
    rill.fake.script(Reply(chunks=answer(["a", "b"])))
    generation_id = await rill.start_chat()
    first = await (await rill.open_stream(generation_id)).read_all()
    again = await (await rill.open_stream(generation_id)).read_all()
    assert [(e.id, e.event, e.data) for e in again] == [(e.id, e.event, e.data) for e in first]

    tail = await (await rill.open_stream(generation_id, last_event_id="2")).read_all()
    assert [e.id for e in tail] == [str(i) for i in range(3, len(first) + 1)]

    last = first[-1].id
    async with rill.session.get(
        rill.url / f"api/chat/{generation_id}/events", headers={"Last-Event-ID": last}
    ) as response:
        assert response.status == 204
    assert len(rill.fake.requests) == 1


async def test_last_event_id_in_query_string(rill: Rill) -> None:
    rill.fake.script(Reply(chunks=answer(["a", "b", "c"])))
    generation_id = await rill.start_chat()
    await (await rill.open_stream(generation_id)).read_all()
    tail = await (await rill.open_stream(generation_id, last_event_id="3", query=True)).read_all()
    assert tail[0].id == "4"


async def test_unknown_generation_is_404_json(rill: Rill) -> None:
    for url in (f"api/chat/{uuid.uuid4().hex}/events", "api/chat/not-an-id/events"):
        async with rill.session.get(rill.url / url) as response:
            assert response.status == 404
            assert (await response.json())["error"]["code"] == "generation_not_found"
    async with rill.session.delete(rill.url / f"api/chat/{uuid.uuid4().hex}") as response:
        assert response.status == 404


async def test_garbage_last_event_id_is_400(rill: Rill) -> None:
    generation_id = await rill.start_chat()
    for value in ("abc", "-1", "1.5", "9" * 20, "٣"):
        async with rill.session.get(
            rill.url / f"api/chat/{generation_id}/events", headers={"Last-Event-ID": value}
        ) as response:
            assert response.status == 400, value
            assert (await response.json())["error"]["code"] == "bad_last_event_id"
    async with rill.session.get(
        rill.url / f"api/chat/{generation_id}/events", headers={"Last-Event-ID": "999"}
    ) as response:
        assert response.status == 400  # ahead of the generation


async def test_models_and_health(rill: Rill) -> None:
    async with rill.session.get(rill.url / "api/models") as response:
        models = await response.json()
    assert models["demo"] is False
    assert models["default"] == "fake-chat"
    assert [m["id"] for m in models["models"]] == ["fake-chat", "fake-reasoner"]
    assert [m["reasoning"] for m in models["models"]] == [False, True]

    async with rill.session.get(rill.url / "healthz") as response:
        health = await response.json()
    assert health["status"] == "ok"
    assert health["demo"] is False
    assert health["live_generations"] == 0
    assert health["version"]
    assert health["uptime_s"] >= 0


async def test_index_page_is_served(rill: Rill) -> None:
    async with rill.session.get(rill.url / "") as response:
        assert response.status == 200
        assert "Rill" in await response.text()


async def test_static_files_are_served_and_cannot_escape_their_folder(rill: Rill) -> None:
    async with rill.session.get(rill.url / "static/app.css") as response:
        assert response.status == 200
        assert "body" in await response.text()
    for path in ("/static/..%2fconfig.toml", "/static/%2e%2e/%2e%2e/server/config.py", "/static/missing.css"):
        async with rill.session.get(URL(str(rill.url) + path, encoded=True)) as response:
            assert response.status == 404, path
            assert (await response.json())["error"]["code"] == "not_found"
