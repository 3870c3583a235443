"""Where generations live: lookup by id and client_id, concurrency limits, and the
retention of ended generations (resumable for a TTL, within a memory cap)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable

import aiohttp

from server.access.clients import RateWindow
from server.config import Config
from server.http.errors import ApiError
from server.relay.generation import Generation
from server.relay.upstream import ChatRequest

log = logging.getLogger(__name__)


def too_many_generations(limit: int) -> ApiError:
    return ApiError(
        429,
        "too_many_generations",
        f"You already have {limit} answers streaming. Wait for one to finish or stop one.",
        headers={"Retry-After": "5"},
    )


def rate_limited(limit: int, wait: int) -> ApiError:
    return ApiError(
        429,
        "rate_limited",
        f"You started {limit} answers in the last minute, the limit. Try again in {wait} s.",
        headers={"Retry-After": str(wait)},
    )


class GenerationRegistry:
    def __init__(self, config: Config, on_end: Callable[[Generation], None] | None = None) -> None:
        self._config = config
        self._on_end = on_end  # e.g. the metrics, told once per ended generation
        self._by_id: dict[str, Generation] = {}
        self._by_client_id: dict[str, Generation] = {}
        self._live: set[Generation] = set()
        self._ended: OrderedDict[str, Generation] = OrderedDict()  # oldest ending first
        self._live_per_client: Counter[str] = Counter()
        self.ended_bytes = 0  # what ended generations' buffers hold; live ones are bounded by the limits
        self.accepting = True  # False once shutdown has begun
        self._none_live = asyncio.Event()
        self._none_live.set()
        self._new_per_client = RateWindow(config.limits.generations_per_minute)
        # Shared mode: told of each generation made here, before its first event, and of
        # each one discarded before it ran.
        self.on_start: Callable[[Generation], None] | None = None
        self.on_discard: Callable[[Generation], None] | None = None

    @property
    def max_bytes(self) -> int:
        return int(self._config.stream.buffer_memory_mb * 1024 * 1024)

    def get(self, generation_id: str) -> Generation | None:
        return self._by_id.get(generation_id)

    def find_by_client_id(self, client_id: str) -> Generation | None:
        return self._by_client_id.get(client_id)

    def live(self) -> list[Generation]:
        return list(self._live)

    def upstream_open(self) -> list[Generation]:
        """Live ones, and ended ones still settling their upstream connection."""
        return [generation for generation in self._by_id.values() if generation.upstream_open]

    def __len__(self) -> int:
        return len(self._by_id)

    def start(
        self,
        session: aiohttp.ClientSession,
        request: ChatRequest,
        *,
        client_key: str,
        client_id: str | None,
        fingerprint: str,
        owner: str | None = None,
        keep_unread: bool = False,
        launch: bool = True,
        generation_id: str | None = None,
    ) -> Generation:
        """Check the limits, then create and start a generation (the upstream call begins
        now). launch=False: created and counted, but the model is not asked until
        launch(), or ever if discard() comes first (a stored answer's rows are written
        in between)."""
        if not self.accepting:
            raise ApiError(503, "shutting_down", "Rill is shutting down. Try again in a moment.")
        limits = self._config.limits
        if len(self._live) >= limits.max_concurrent_total:
            raise ApiError(
                429,
                "server_busy",
                f"Rill is already streaming {limits.max_concurrent_total} answers, its limit. Try again in a moment.",
                headers={"Retry-After": "5"},
            )
        if self._live_per_client[client_key] >= limits.max_concurrent_per_client:
            raise too_many_generations(limits.max_concurrent_per_client)
        wait = self._new_per_client.hit(client_key, asyncio.get_running_loop().time())
        if wait:
            raise rate_limited(limits.generations_per_minute, wait)
        generation = Generation(
            generation_id=generation_id or uuid.uuid4().hex,
            request=request,
            config=self._config,
            client_key=client_key,
            client_id=client_id,
            fingerprint=fingerprint,
            on_end=self._ended_callback,
            owner=owner,
            keep_unread=keep_unread,
        )
        self._by_id[generation.id] = generation
        if client_id is not None:
            self._by_client_id[client_id] = generation
        self._live.add(generation)
        self._none_live.clear()
        self._live_per_client[client_key] += 1
        if self.on_start is not None:
            self.on_start(generation)
        if launch:
            generation.start(session)
        return generation

    async def wait_none_live(self) -> None:
        """Until no answer is live (a stop letting answers in flight finish)."""
        await self._none_live.wait()

    def _no_longer_live(self, generation: Generation) -> None:
        self._live.discard(generation)
        if not self._live:
            self._none_live.set()

    def launch(self, generation: Generation, session: aiohttp.ClientSession) -> None:
        generation.start(session)

    def discard(self, generation: Generation) -> None:
        """A generation made with launch=False that will not run: as if never started
        (its id and client_id forgotten, its place in the limits given back)."""
        assert not generation.launched, "discard() is for generations never launched"
        if self.on_discard is not None:
            self.on_discard(generation)
        self._by_id.pop(generation.id, None)
        if generation.client_id is not None and self._by_client_id.get(generation.client_id) is generation:
            del self._by_client_id[generation.client_id]
        if generation in self._live:
            self._no_longer_live(generation)
            self._live_per_client[generation.client_key] -= 1
            if self._live_per_client[generation.client_key] <= 0:
                del self._live_per_client[generation.client_key]

    def _ended_callback(self, generation: Generation) -> None:
        if self._on_end is not None:
            self._on_end(generation)
        self._no_longer_live(generation)
        self._live_per_client[generation.client_key] -= 1
        if self._live_per_client[generation.client_key] <= 0:
            del self._live_per_client[generation.client_key]
        self._ended[generation.id] = generation
        self.ended_bytes += generation.size_bytes
        self.evict()

    def evict(self) -> None:
        """Forget ended generations past their TTL, then the oldest ones over the memory cap.

        An answer that ended less than `resume_grace` ago is kept even over the cap: its
        reader may be reconnecting right now to fetch the last events.
        """
        stream = self._config.stream
        now = asyncio.get_running_loop().time()
        while self._ended:
            oldest = next(iter(self._ended.values()))
            assert oldest.ended_at is not None
            age = now - oldest.ended_at
            expired = age >= stream.finished_ttl
            over_cap = self.ended_bytes > self.max_bytes and age >= stream.resume_grace
            if not (expired or over_cap):
                break
            self._forget(oldest)

    def _forget(self, generation: Generation) -> None:
        del self._ended[generation.id]
        del self._by_id[generation.id]
        if generation.client_id is not None:
            self._by_client_id.pop(generation.client_id, None)
        self.ended_bytes -= generation.size_bytes
        log.debug("generation %s evicted", generation.id)
