"""Talking to an OpenAI-compatible chat completions API: one streaming request,
retries before the first token, deadlines, and a human message for every failure."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

try:
    import orjson
except ImportError:  # optional: a faster parser for the model API's chunks
    orjson = None  # type: ignore[assignment]

from .bodytap import tapped
from .config import Config, ModelConfig, ProviderConfig
from .inflate import ENCODINGS, BadEncoding, Inflating, inflate_some
from .sse import SSEEvent, SSEEventTooLarge, SSEParser, SSEProtocolError

log = logging.getLogger(__name__)

RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
_KEY_LIKE = re.compile(r"\bsk-[A-Za-z0-9_\-]{6,}")
_DETAIL_MAX = 300
_ERROR_BODY_MAX = 64 * 1024

# What one answer may take from the model API by default, per token of its max_tokens: a
# token is a few bytes of text (a few dozen at most), and it usually comes in a JSON
# chunk of its own: ~300 bytes in DeepSeek's chunk shape, ~370 in OpenRouter's, up to
# ~500 with a long token's text escaped. 1 KiB is twice that, and leaves room for an
# upstream whose own default max_tokens is above our ceiling; the floor covers the chunks
# around the text (role, finish, usage) and a queued request's keep-alives when
# max_tokens is small. Everything kept of an answer fits within this many bytes.
ANSWER_BYTES_PER_TOKEN = 1024
ANSWER_BYTES_MIN = 1024 * 1024


class UpstreamError(Exception):
    """The model API failed; `code` is stable, `message` tells a person what to do."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        retryable: bool = False,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable
        self.status = status
        self.retry_after = retry_after


class ChatSink(Protocol):
    """Receives the pieces of an answer as they arrive."""

    def on_reasoning(self, text: str) -> None: ...
    def on_content(self, text: str) -> None: ...
    def on_usage(self, usage: Mapping[str, Any]) -> None: ...
    def on_finish(self, finish_reason: str) -> None:
        """The answer is complete (stream_chat still settles the connection, then returns)."""


@dataclass(frozen=True, slots=True)
class ChatRequest:
    provider: ProviderConfig
    model: ModelConfig
    messages: Sequence[Mapping[str, str]]
    temperature: float | None = None
    max_tokens: int | None = None

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model.upstream_id,
            "messages": list(self.messages),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        body.update(self.model.extra)
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        return body

    def headers(self) -> dict[str, str]:
        # identity: a compressed stream costs CPU to inflate and can hide a bomb (see inflate.py)
        headers = {"Accept": "text/event-stream", "Accept-Encoding": "identity", "Content-Type": "application/json"}
        if self.provider.api_key is not None:
            headers["Authorization"] = f"Bearer {self.provider.api_key.reveal()}"
        return headers


def scrub(text: str, secrets: Sequence[str]) -> str:
    """Remove secrets (and anything shaped like an API key) from text we did not write."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return _KEY_LIKE.sub("sk-***", text)


def answer_limit(request: ChatRequest, config: Config) -> int:
    """Bytes of stream (decompressed) one answer may take: [limits] max_answer_bytes, or
    derived from the request's max_tokens (else the server's ceiling for it)."""
    if config.limits.max_answer_bytes:
        return config.limits.max_answer_bytes
    max_tokens = request.max_tokens or config.limits.max_tokens
    return max(ANSWER_BYTES_MIN, max_tokens * ANSWER_BYTES_PER_TOKEN)


def client_timeout(config: Config) -> aiohttp.ClientTimeout:
    """No total: answers stream for minutes. sock_read is the idle limit between bytes."""
    t = config.timeouts
    return aiohttp.ClientTimeout(total=None, connect=t.connect, sock_connect=t.connect, sock_read=t.idle_read)


async def stream_chat(
    session: aiohttp.ClientSession,
    request: ChatRequest,
    sink: ChatSink,
    config: Config,
) -> str:
    """Stream one answer into `sink`; return the finish reason or raise UpstreamError.

    Retries (429, 5xx, connection failures) happen only before the response starts:
    once a token has been relayed, asking again could bill twice and repeat text.
    """
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    max_end = loop.time() + config.timeouts.max_generation
    first_token_end = loop.time() + config.timeouts.first_token
    got_token = False

    def first_token() -> None:
        nonlocal got_token
        got_token = True
        # From here the body's one timer keeps max_end as well (a uvloop timer is ~0.6 KB).
        deadline.reschedule(None)

    try:
        async with asyncio.timeout_at(min(max_end, first_token_end)) as deadline:
            response = await _open_with_retries(session, request, config)
            try:
                _check_event_stream(response, config)
                body = _AnswerBody(sink, config, first_token, max_end, answer_limit(request, config))
                inflating = _inflating(response, body, config)
                async with tapped(response.content, inflating or body):
                    body.watch(response)
                    try:
                        finish_reason = _finish_reason(await body.finished, body.finish_reason)
                        sink.on_finish(finish_reason)  # readers hear of the end before the connection is settled
                        deadline.reschedule(None)  # the body's last bytes are held to no deadline but their own
                        body_ended = await body.settle()
                    finally:
                        body.stop_watching()
                        if inflating is not None:
                            inflating.close()
            except BaseException:
                response.close()  # drop the connection now: nobody pays for unread tokens
                raise
            if body_ended:
                response.release()  # aiohttp has already put the connection back in the pool
            else:
                response.close()
            return finish_reason
    except TimeoutError as exc:
        if isinstance(exc, aiohttp.ServerTimeoutError):
            raise _timeout_error(exc, config) from None
        if got_token or loop.time() >= max_end:
            raise UpstreamError(
                "generation_timeout",
                f"The answer took longer than the {config.timeouts.max_generation:g} s limit "
                "and was stopped. The text so far is kept.",
            ) from None
        raise UpstreamError(
            "upstream_first_token_timeout",
            f"The model API sent no answer within {config.timeouts.first_token:g} s "
            "(it may be overloaded or queueing). Try again in a moment.",
            retryable=True,
        ) from None
    finally:
        log.debug("upstream request ended after %.3f s", time.monotonic() - started)


# How long the end of a body may take after [DONE] for its connection to be kept: it
# usually follows at once, and a kept connection spares the next answer a TCP and TLS
# handshake. An upstream that keeps the body open longer is cut off.
BODY_END_WAIT = 1.0


async def _open_with_retries(
    session: aiohttp.ClientSession, request: ChatRequest, config: Config
) -> aiohttp.ClientResponse:
    attempts = config.upstream.retries + 1
    for attempt in range(attempts):
        try:
            response = await session.post(
                request.provider.completions_url,
                json=request.body(),
                headers=request.headers(),
            )
        except aiohttp.ServerTimeoutError as exc:
            error = _timeout_error(exc, config)
        except aiohttp.ClientConnectorError:
            error = _unreachable(request.provider)
        except aiohttp.ClientError:
            error = UpstreamError(
                "upstream_unreachable",
                "The connection to the model API failed before it answered. Try again.",
                retryable=True,
            )
        else:
            if response.status == 200:
                return response
            try:
                error = await _status_error(response, request.provider, config)
            finally:
                response.release()
        if not error.retryable or attempt + 1 == attempts:
            raise error
        delay = config.upstream.retry_backoff * 2**attempt
        if error.retry_after is not None:
            if error.retry_after > config.upstream.max_retry_after:
                raise error
            delay = max(delay, error.retry_after)
        log.info(
            "upstream %s (%s), retry %d/%d in %.2f s",
            error.code,
            error.status or "-",
            attempt + 1,
            attempts - 1,
            delay,
        )
        await asyncio.sleep(delay)
    raise AssertionError("unreachable: the loop returns or raises")


def _unreachable(provider: ProviderConfig) -> UpstreamError:
    url = provider.base_url
    return UpstreamError(
        "upstream_unreachable",
        f"Could not connect to the model API at {url.host}:{url.port}. "
        "Check that it is running and that base_url in config.toml is right.",
        retryable=True,
    )


def _timeout_error(exc: aiohttp.ServerTimeoutError, config: Config) -> UpstreamError:
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamError(
            "upstream_connect_timeout",
            f"The model API did not accept a connection within {config.timeouts.connect:g} s. Try again in a moment.",
            retryable=True,
        )
    return UpstreamError(
        "upstream_idle_timeout",
        f"The model API sent nothing new for {config.timeouts.idle_read:g} s, so Rill gave up "
        "waiting. The text so far is kept.",
        retryable=True,
    )


async def _status_error(response: aiohttp.ClientResponse, provider: ProviderConfig, config: Config) -> UpstreamError:
    status = response.status
    detail = await _error_detail(response, config)
    said = _said(detail)
    if status == 401 or status == 403:
        where = provider.api_key_env or "the provider's API key"
        return UpstreamError(
            "upstream_auth",
            f"The model API rejected the API key (HTTP {status}). Check {where} and restart Rill.{said}",
            status=status,
        )
    if status == 402:
        return UpstreamError(
            "upstream_payment",
            "The model provider says the account has insufficient balance (HTTP 402). "
            f"Top up the account, then try again.{said}",
            status=status,
        )
    if status == 429:
        retry_after = _retry_after(response.headers.get("Retry-After"))
        wait = f" in {retry_after:g} s" if retry_after is not None else " in a moment"
        return UpstreamError(
            "upstream_rate_limited",
            f"The model API is rate limiting requests (HTTP 429). Try again{wait}.{said}",
            retryable=True,
            status=status,
            retry_after=retry_after,
        )
    if status >= 500:
        kind = "is overloaded" if status == 503 else "had a server error"
        return UpstreamError(
            "upstream_unavailable",
            f"The model API {kind} (HTTP {status}). Try again in a moment.{said}",
            retryable=status in RETRYABLE_STATUSES,
            status=status,
        )
    if status == 422:
        return UpstreamError(
            "upstream_bad_params",
            f"The model API did not accept the parameters (HTTP 422).{said}",
            status=status,
        )
    if status == 404:
        return UpstreamError(
            "upstream_not_found",
            "The model API answered 404: check base_url in config.toml "
            f"(requests go to <base_url>/chat/completions).{said}",
            status=status,
        )
    return UpstreamError(
        "upstream_bad_request",
        f"The model API rejected the request (HTTP {status}). Check the model name and options.{said}",
        status=status,
    )


def _said(detail: str) -> str:
    """The upstream's own words as a sentence of our message."""
    if not detail:
        return ""
    end = "" if detail[-1] in ".!?…。" else "."
    return f" The API said: {detail}{end}"


def _clean_detail(text: str, config: Config) -> str:
    """One line, secrets removed (before cutting, so no key is cut in half), kept short."""
    text = scrub(" ".join(text.split()), config.secrets)
    if len(text) > _DETAIL_MAX:
        text = text[: _DETAIL_MAX - 1] + "…"
    return text


async def _error_detail(response: aiohttp.ClientResponse, config: Config) -> str:
    """The API's own error message, scrubbed of secrets and cut short."""
    raw = b""
    try:
        while len(raw) < _ERROR_BODY_MAX and (piece := await response.content.readany()):
            raw += piece
    except (aiohttp.ClientError, TimeoutError):
        return ""
    encoding = _content_encoding(response)
    if encoding in ENCODINGS:
        try:  # the session does not inflate (see inflate.py): at most as much as a plain body
            raw = inflate_some(raw, encoding, _ERROR_BODY_MAX)
        except BadEncoding:
            return ""
    elif encoding:
        return ""  # compressed in a way Rill does not read: no detail rather than noise
    text = raw.decode("utf-8", errors="replace")
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        error = parsed.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            text = error["message"]
        elif isinstance(error, str):
            text = error
        elif isinstance(parsed.get("message"), str):
            text = parsed["message"]
    return _clean_detail(text, config)


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP date: rare from model APIs, fall back to our backoff
    return seconds if seconds >= 0 else None


def _check_event_stream(response: aiohttp.ClientResponse, config: Config) -> None:
    content_type = response.headers.get("Content-Type", "")
    if "text/event-stream" not in content_type:
        raise UpstreamError(
            "upstream_bad_data",
            f"The model API answered with {_clean_detail(content_type, config) or 'no content type'} instead of "
            "an event stream. Check base_url in config.toml.",
        )


def _content_encoding(response: aiohttp.ClientResponse) -> str:
    encoding = response.headers.get("Content-Encoding", "").strip().lower()
    return "" if encoding == "identity" else encoding


def _inflating(response: aiohttp.ClientResponse, body: _AnswerBody, config: Config) -> Inflating | None:
    """For a body the upstream compressed although asked not to: an Inflating in front of
    `body`, pausing the connection while inflated bytes wait."""
    encoding = _content_encoding(response)
    if not encoding:
        return None
    if encoding not in ENCODINGS:
        raise UpstreamError(
            "upstream_bad_data",
            f"The model API compressed its stream as {_clean_detail(encoding, config)}, although Rill "
            "asked it not to, and Rill cannot read that.",
        )
    connection = response.connection
    protocol = connection.protocol if connection is not None else None
    if protocol is None:  # the body has already ended: nothing left to pace
        return Inflating(body, encoding, pause=_nothing, resume=_nothing, done=body.finished.done)
    # What aiohttp's own StreamReader calls to hold a connection while its buffer is full
    # (aiohttp 3.14.5; test_a_large_compressed_answer_is_read_in_pieces checks they still hold it).
    return Inflating(
        body, encoding, pause=protocol.pause_reading, resume=protocol.resume_reading, done=body.finished.done
    )


def _nothing() -> None:
    pass


def _finish_reason(saw_done: bool, finish_reason: str | None) -> str:
    """How the answer ended, or why it counts as cut."""
    if saw_done:
        return _finish(finish_reason or "stop")
    if finish_reason is not None:
        return _finish(finish_reason)  # ended without [DONE], but the answer was complete
    raise UpstreamError(
        "upstream_cut",
        "The connection to the model API ended before the answer was complete. "
        "The text so far is kept; you can continue or regenerate.",
        retryable=True,
    )


class _AnswerBody:
    """The upstream's event stream, handled as its bytes arrive (a BodySink).

    `finished` becomes True at `[DONE]`, False when the body ends without it, or holds
    the failure: a bad chunk, a malformed stream, a dropped or idle connection, an answer
    past `max_bytes`, or a plain TimeoutError at `end` (max_generation). `ended` becomes
    True when the body itself ends cleanly (the connection can be kept), False when it
    breaks off.

    Idle means no progress for idle_read. Before the first token any byte is progress:
    an API queueing the request sends keep-alive comments, and first_token bounds that
    wait. From the first token on only the answer is: text, usage or a finish reason;
    comments, blank lines and chunks with nothing in them are not."""

    __slots__ = (
        "_bytes_left",
        "_closed",
        "_config",
        "_end",
        "_idle_timer",
        "_last_progress",
        "_loop",
        "_max_bytes",
        "_on_first_token",
        "_parser",
        "_sink",
        "ended",
        "finish_reason",
        "finished",
    )

    def __init__(
        self, sink: ChatSink, config: Config, on_first_token: Callable[[], None], end: float, max_bytes: int
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._end = end  # loop time
        self._sink = sink
        self._config = config
        self._on_first_token: Callable[[], None] | None = on_first_token
        self._parser = SSEParser(
            max_line_chars=config.upstream.max_line_chars, max_event_chars=config.upstream.max_event_chars
        )
        self._max_bytes = max_bytes
        self._bytes_left = max_bytes
        self._last_progress = self._loop.time()
        self._idle_timer: asyncio.TimerHandle | None = None
        self._closed: asyncio.Future[None] | None = None
        self.finish_reason: str | None = None
        self.finished: asyncio.Future[bool] = self._loop.create_future()
        self.ended: asyncio.Future[bool] = self._loop.create_future()

    # --- watching the connection ----------------------------------------------------------

    def watch(self, response: aiohttp.ClientResponse) -> None:
        """Takes over sock_read for the body (aiohttp moves a timer on every chunk; this one
        wakes at most once per idle_read and re-arms from the last progress, and also ends
        the body at `end`), and notices the connection closing under a body that never got its
        end (aiohttp, on a malformed chunk, closes it and tells only the connection)."""
        connection = response.connection
        if connection is None or connection.protocol is None:
            return  # the body has already ended
        protocol = connection.protocol
        protocol.read_timeout = None  # set again for the connection's next request
        due = min(self._last_progress + self._config.timeouts.idle_read, self._end)
        self._idle_timer = self._loop.call_at(due, self._check_idle)
        self._closed = protocol.closed
        if self._closed is not None:
            self._closed.add_done_callback(_seen)  # stays: the connection may outlive this body
            self._closed.add_done_callback(self._connection_closed)

    def stop_watching(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._closed is not None:
            self._closed.remove_done_callback(self._connection_closed)
            self._closed = None

    def _check_idle(self) -> None:
        self._idle_timer = None
        if self.finished.done():
            return
        now = self._loop.time()
        if now >= self._end:
            self.finished.set_exception(TimeoutError())  # stream_chat's deadline: generation_timeout
            return
        due = self._last_progress + self._config.timeouts.idle_read
        if now >= due:
            self.finished.set_exception(aiohttp.SocketTimeoutError("Timeout on reading data from socket"))
        else:
            self._idle_timer = self._loop.call_at(min(due, self._end), self._check_idle)

    def _connection_closed(self, closed: asyncio.Future[None]) -> None:
        self.body_end(aiohttp.ClientPayloadError("The connection closed before the body ended"))

    async def settle(self) -> bool:
        """After [DONE]: waits a moment for the body's end; whether it ended cleanly."""
        try:
            async with asyncio.timeout(BODY_END_WAIT):
                return await self.ended
        except TimeoutError:
            return False

    # --- BodySink ----------------------------------------------------------------------

    def body_data(self, data: bytes) -> None:
        if self.finished.done():
            return  # what follows [DONE] (or a failure) is of no use
        self._bytes_left -= len(data)
        if self._bytes_left < 0:
            self.finished.set_exception(self._too_large())  # nothing of this piece: the cap is a cap
            return
        if self._on_first_token is not None:
            self._last_progress = self._loop.time()  # before the first token any byte counts
        try:
            # The usual chunk, one complete `data:` line, skips the general parser.
            line = self._parser.single_data(data)
            if line is not None:
                if line == b"[DONE]":
                    self.finished.set_result(True)
                    return
                if (chunk := _loads_fast(line)) is not None:
                    self._handle(chunk)
                    return
            self._take(self._parser.feed, data)
        except Exception as exc:  # raised in the task awaiting `finished`, as if read there
            self.finished.set_exception(exc)

    def body_end(self, error: BaseException | None) -> None:
        if not self.ended.done():
            self.ended.set_result(error is None)
        if self.finished.done():
            return
        if isinstance(error, TimeoutError):
            self.finished.set_exception(error)  # aiohttp's own read timeout, before watch() took over
            return
        # A body cut off, however the reader reports it, is judged like a plain end:
        # complete only if [DONE] or a finish reason came.
        try:
            self._take(lambda _: self._parser.feed_eof(), b"")
        except Exception as exc:
            self.finished.set_exception(exc)
        else:
            if self.finished.done():
                return
            if isinstance(error, BadEncoding):  # what came whole before it has counted
                self.finished.set_exception(
                    UpstreamError(
                        "upstream_bad_data",
                        "The model API sent a compressed stream that could not be decoded. The text so far is kept.",
                    )
                )
            else:
                self.finished.set_result(False)

    # --- parsing ------------------------------------------------------------------------

    def _too_large(self) -> UpstreamError:
        return UpstreamError(
            "answer_too_large",
            f"The answer passed this server's size limit ({_megabytes(self._max_bytes)} of stream from "
            "the model API) and was stopped. The text so far is kept.",
        )

    def _take(self, parse: Callable[[bytes], list[SSEEvent]], data: bytes) -> None:
        try:
            events = parse(data)
        except SSEProtocolError as exc:
            if self._take_events(exc.events):  # what came intact before the bad line still counts
                return
            if isinstance(exc, SSEEventTooLarge):
                raise UpstreamError(
                    "upstream_event_too_large",
                    f"The model API sent one event longer than {self._config.upstream.max_event_chars} "
                    "characters, so Rill stopped reading it. The text so far is kept.",
                ) from None
            raise UpstreamError("upstream_bad_data", f"The model API sent a malformed stream ({exc}).") from None
        self._take_events(events)

    def _take_events(self, events: list[SSEEvent]) -> bool:
        """Handles events in order; True (and finished) once `[DONE]` is seen."""
        for event in events:
            if event.data == "[DONE]":
                self.finished.set_result(True)
                return True
            try:
                chunk = _loads(event.data)
            except (ValueError, RecursionError):  # RecursionError: json on absurdly deep nesting
                raise UpstreamError("upstream_bad_data", "The model API sent a chunk that is not valid JSON.") from None
            self._handle(chunk)
        return False

    def _handle(self, chunk: Any) -> None:
        if not isinstance(chunk, dict):
            raise UpstreamError("upstream_bad_data", "The model API sent a chunk that is not an object.")
        if error := chunk.get("error"):
            raise _stream_error(error, self._config)
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._sink.on_usage(usage)
            self._last_progress = self._loop.time()
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices:
            return
        choice = choices[0]
        if not isinstance(choice, dict):
            return
        delta = choice.get("delta")
        if isinstance(delta, dict):
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                self._first_token()
                self._sink.on_reasoning(reasoning)
                self._last_progress = self._loop.time()
            content = delta.get("content")
            if isinstance(content, str) and content:
                self._first_token()
                self._sink.on_content(content)
                self._last_progress = self._loop.time()
        finish = choice.get("finish_reason")
        if isinstance(finish, str) and finish:
            self.finish_reason = finish
            self._last_progress = self._loop.time()

    def _first_token(self) -> None:
        if self._on_first_token is not None:
            self._on_first_token()
            self._on_first_token = None


def _megabytes(size: int) -> str:
    return f"{size / 1_048_576:.3g} MB"


def _seen(closed: asyncio.Future[None]) -> None:
    """Marks a connection's closing error as retrieved: how it closed is told elsewhere."""
    if not closed.cancelled():
        closed.exception()


def _finish(reason: str) -> str:
    if reason == "insufficient_system_resource":
        raise UpstreamError(
            "upstream_overloaded",
            "The model ran out of resources before finishing. The text so far is kept; try again in a moment.",
            retryable=True,
        )
    if reason in ("stop", "length", "content_filter"):
        return reason
    return "stop"  # tool_calls and vendor-specific reasons end a plain chat normally


def _loads(data: str) -> Any:
    """json.loads, by orjson when it is installed (a quarter of the time per chunk). What
    orjson refuses and json accepts (NaN, escaped lone surrogates) goes to json as before."""
    if orjson is not None:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    return json.loads(data)


def _loads_fast(data: bytes) -> Any:
    """orjson straight from the wire bytes; None when it is missing or refuses them (also
    bytes that are not UTF-8): the general path then gives the answer json would."""
    if orjson is not None:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    return None


def _stream_error(error: Any, config: Config) -> UpstreamError:
    message = ""
    if isinstance(error, dict):
        message = str(error.get("message") or "")
    elif isinstance(error, str):
        message = error
    message = _clean_detail(message, config)
    said = _said(message)
    return UpstreamError(
        "upstream_error",
        f"The model API reported an error in the middle of the answer.{said} The text so far is kept.",
        retryable=True,
    )
