"""GET /metrics: Prometheus text that agrees with what happened."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from .conftest import Rill, StartRill, wait_for
from .fakes import Reply, chunk


async def scrape(rill: Rill) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with rill.session.get(rill.url / "metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = await response.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_a_finished_answer_is_counted(rill: Rill) -> None:
    generation_id = await rill.start_chat()  # the fake answers "Hello", " world"
    await (await rill.open_stream(generation_id)).read_all()
    await wait_for(lambda: not rill.registry.live())
    samples = await scrape(rill)
    assert value(samples, "rill_generations_total", outcome="stop") == 1
    assert value(samples, "rill_tokens_relayed_total") == 2
    assert value(samples, "rill_upstream_first_token_seconds_count") == 1
    assert value(samples, "rill_live_generations") == 0
    assert value(samples, "rill_cancellations_total", reason="stop") == 0


async def test_errors_stops_and_resumes_are_counted(rill: Rill) -> None:
    rill.fake.script(
        Reply(status=401, body=b'{"error": {"message": "Authentication Fails"}}'),
        Reply(chunks=[chunk("partial")], end="hang"),
    )
    failed = await rill.start_chat()
    await (await rill.open_stream(failed)).read_all()
    stopped = await rill.start_chat(messages=[{"role": "user", "content": "again"}])
    reader = await rill.open_stream(stopped)
    first = await reader.read_until("delta")
    resumed = await rill.open_stream(stopped, first.id)
    samples = await scrape(rill)
    assert value(samples, "rill_live_generations") == 1
    assert value(samples, "rill_subscribers") == 2
    assert value(samples, "rill_resumes_total") == 1

    async with rill.session.delete(rill.url / f"api/chat/{stopped}") as response:
        assert response.status == 200
    await reader.read_all()
    await resumed.read_all()
    samples = await scrape(rill)
    assert value(samples, "rill_upstream_errors_total", code="upstream_auth") == 1
    assert value(samples, "rill_generations_total", outcome="error") == 1
    assert value(samples, "rill_generations_total", outcome="cancelled") == 1
    assert value(samples, "rill_cancellations_total", reason="stop") == 1
    assert value(samples, "rill_live_generations") == 0


async def test_the_monitor_reports_its_lag(rill: Rill) -> None:
    await asyncio.sleep(0.35)  # the monitor ticks every liveness_interval (0.1 s here)
    samples = await scrape(rill)
    ticks = value(samples, "rill_heartbeat_lag_seconds_count")
    assert ticks >= 2
    assert value(samples, "rill_heartbeat_lag_seconds_sum") / ticks < 0.1  # an idle loop is barely late


async def test_metrics_of_two_apps_are_separate(start_rill: StartRill) -> None:
    first, second = await start_rill(), await start_rill()
    generation_id = await first.start_chat()
    await (await first.open_stream(generation_id)).read_all()
    await wait_for(lambda: not first.registry.live())
    assert value(await scrape(first), "rill_generations_total", outcome="stop") == 1
    assert value(await scrape(second), "rill_generations_total", outcome="stop") == 0
