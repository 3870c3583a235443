"""An ended answer is freed the moment Rill forgets it, by reference counting alone.

Rill makes full collections rare (server/__main__.py: gc.set_threshold(700, 10, 100)),
so anything an answer leaves in a reference cycle waits there for many minutes, the
upstream response and its buffers with it: the soak (`python -m bench soak`) measured
it as RSS growing without a plateau. Here the collector is off, so a cycle keeps the
generation alive for good and the test fails."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.run import ROOT, free_port, http_probe, wait_ready
from server.ops.memory import pin_malloc_thresholds

from .conftest import StartRill, wait_for
from .fakes import FakeUpstream, Reply, answer


@pytest.fixture
def no_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.usefixtures("no_collector")
@pytest.mark.parametrize(
    "ending", ["complete", "stopped", "abandoned", "upstream_cut", "upstream_error", "upstream_silent"]
)
async def test_an_ended_answer_needs_no_cycle_collector(
    start_rill: StartRill, fake_upstream: FakeUpstream, ending: str
) -> None:
    rill = await start_rill(
        stream={"resume_grace": 0.3, "finished_ttl": 0.2, "liveness_interval": 0.05},
        timeouts={"first_token": 0.3},
    )
    if ending == "upstream_cut":
        fake_upstream.script(Reply(chunks=answer(["Hello", " world"])[:3], end="cut"))
    elif ending == "upstream_error":
        fake_upstream.script(*[Reply(status=503, body=b'{"error": {"message": "busy"}}')] * 3)
    elif ending == "upstream_silent":
        fake_upstream.script(Reply(chunks=[b": keep-alive\n\n"], end="hang"))
    elif ending != "complete":
        fake_upstream.script(Reply(chunks=answer(["token "] * 500, delay=0.01)))  # ~5 s: ended before that
    generation_id = await rill.start_chat()
    found = rill.registry.get(generation_id)
    assert found is not None
    generation = weakref.ref(found)
    del found
    if ending != "abandoned":  # abandoned: nobody ever reads, resume_grace ends it
        reader = await rill.open_stream(generation_id)
        if not ending.startswith(("upstream_error", "upstream_silent")):
            await reader.read_until("delta")
        if ending == "stopped":
            async with rill.session.delete(rill.url / f"api/chat/{generation_id}") as stopped:
                assert stopped.status == 200
        await reader.read_all()
    await wait_for(lambda: rill.registry.get(generation_id) is None)  # ended, then forgotten after finished_ttl
    await wait_for(lambda: generation() is None, timeout=2.0)


def test_access_tokens_leave_no_scrypt_buffer_in_the_heap(tmp_path: Path) -> None:
    """Each access token's cookie key takes a 16 MiB scrypt buffer; without pinned malloc
    thresholds all but the first stayed in the heap, free but resident, for good."""
    port, probe_file, log_path = free_port(), tmp_path / "probe.jsonl", tmp_path / "rill.log"
    (tmp_path / "state").mkdir()
    tokens = ",".join(f"user{n}:memory-test-token-{n:04d}-abcdefgh" for n in range(3))
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY") and not k.startswith(("RILL_", "MALLOC_"))}
    env |= {
        "PYTHONPATH": str(ROOT),
        "RILL_CONFIG": str(ROOT / "config.toml"),
        "RILL_PORT": str(port),
        "RILL_ACCESS_TOKENS": tokens,
        "RILL_STATE_DIR": str(tmp_path / "state"),
        "BENCH_PROBE_FILE": str(probe_file),
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.probe"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        wait_ready(http_probe(f"http://127.0.0.1:{port}/readyz"), process, log_path, "Rill")
        os.kill(process.pid, signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while not probe_file.exists() or not probe_file.read_text().endswith("\n"):
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        heap = json.loads(probe_file.read_text())["malloc"]
    finally:
        process.terminate()
        process.wait(timeout=20)
    assert heap["fordblks"] < 4 * 2**20, heap  # free inside the heap: was 16.7 MiB


def test_an_operators_malloc_settings_are_kept() -> None:
    assert not pin_malloc_thresholds({"MALLOC_TRIM_THRESHOLD_": "1048576"})
    assert not pin_malloc_thresholds({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"})
