"""Talking to an OpenAI-compatible chat completions API: one streaming request,
retries before the first token, deadlines, and a human message for every failure."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from yarl import URL

from server.config import Config, ModelConfig, ProviderConfig
from server.jsoncodec import dumps, loads, loads_fast
from server.ops.scrub import shown
from server.relay.bodytap import tapped
from server.relay.inflate import ENCODINGS, BadEncoding, Inflating, inflate_some
from server.relay.sse import SSEEvent, SSEEventTooLarge, SSEParser, SSEProtocolError

log = logging.getLogger(__name__)

RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
_DETAIL_MAX = 300
_URL_MAX = 120  # a redirect target, as shown in a message
_FINISH_MAX = 64  # an unknown finish reason is passed on verbatim up to this length
# Same-origin 307/308 redirects followed in a row: enough for a moved path, not a loop.
MAX_REDIRECTS = 2
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
                        finish_reason = _finish_reason(await body.finished, body.finish_reason, config)
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
            response = await _post(session, request)
        except aiohttp.ServerTimeoutError as exc:
            error = _timeout_error(exc, config)
        except aiohttp.ClientSSLError as exc:
            error = _tls_error(exc, request.provider, config)
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


async def _post(session: aiohttp.ClientSession, request: ChatRequest) -> aiohttp.ClientResponse:
    """Sends the request. A redirect is followed only to the same origin (scheme, host and
    port) and only as a 307/308, which keeps the POST, at most MAX_REDIRECTS in a row:
    aiohttp itself would send the conversation and the API key to any host the upstream
    names, even over plain http. Any other redirect is returned, for _status_error."""
    url = request.provider.completions_url
    body = dumps(request.body())  # orjson: a fifth of json's time on a long conversation
    for hop in range(MAX_REDIRECTS + 1):
        response = await session.post(url, data=body, headers=request.headers(), allow_redirects=False)
        if response.status not in (307, 308) or hop == MAX_REDIRECTS:
            return response
        target = _redirect_target(response)
        if target is None or target.origin() != url.origin():
            return response
        response.release()
        log.info("upstream redirect (%d) followed on the same origin", response.status)
        url = target
    raise AssertionError("unreachable: the loop returns")


def _redirect_target(response: aiohttp.ClientResponse) -> URL | None:
    """Where a redirect points (relative to the request), or None without a usable Location."""
    location = response.headers.get("Location")
    if not location:
        return None
    try:
        target = response.url.join(URL(location))
    except (ValueError, TypeError):
        return None
    return target if target.is_absolute() else None


def _shown_url(url: URL, config: Config) -> str:
    """A URL for a message: no credentials, query or fragment, decoded as a person reads it
    (and as scrub finds secrets in it: yarl would percent-encode a JSON escape), secrets
    removed, kept short."""
    try:
        shown = url.with_user(None).with_query(None).with_fragment(None).human_repr()
    except ValueError:
        shown = url.human_repr()
    return _clean_detail(shown, config, limit=_URL_MAX)


def _redirect_error(response: aiohttp.ClientResponse, config: Config) -> UpstreamError:
    status = response.status
    target = _redirect_target(response)
    advice = "If the API has moved, set base_url in config.toml to its new address."
    if target is None:
        message = f"The model API answered with a redirect (HTTP {status}) that names no usable address. {advice}"
    else:
        shown = _shown_url(target, config)
        if target.origin() != response.url.origin():
            message = (
                f"The model API redirected the request to another server ({shown}). Rill does not follow "
                f"that: the conversation and the API key would go with it. {advice}"
            )
        elif status in (307, 308):
            message = (
                f"The model API redirected the request more than {MAX_REDIRECTS} times (last to {shown}). {advice}"
            )
        else:
            message = (
                f"The model API answered HTTP {status} with a redirect to {shown}, which would drop the "
                f"request's body. {advice}"
            )
    log.warning("upstream redirect refused (HTTP %d): %s", status, message)
    return UpstreamError("upstream_redirect", message, status=status)


def _tls_error(exc: aiohttp.ClientSSLError, provider: ProviderConfig, config: Config) -> UpstreamError:
    """A refused certificate (or a failed TLS handshake) is no outage: asking again in a
    moment gets the same answer, so it is not retried. Only an EOF or reset in the middle
    of the handshake may be passing."""
    url = provider.base_url
    cause = exc.certificate_error if isinstance(exc, aiohttp.ClientConnectorCertificateError) else exc.os_error
    if isinstance(cause, ssl.SSLCertVerificationError):
        why = _clean_detail(str(getattr(cause, "verify_message", None) or ""), config)
        message = (
            f"Rill refused the TLS certificate of the model API at {url.host}:{url.port}"
            f"{f' ({why})' if why else ''}. Check base_url in config.toml, or the certificate on that server."
        )
    elif isinstance(cause, ssl.SSLEOFError | ssl.SSLZeroReturnError | ssl.SSLSyscallError):
        return _unreachable(provider)
    else:
        reason = getattr(cause, "reason", None)
        why = _clean_detail(reason.replace("_", " ").lower(), config) if isinstance(reason, str) else ""
        message = (
            f"The TLS handshake with the model API at {url.host}:{url.port} failed"
            f"{f' ({why})' if why else ''}. Check base_url in config.toml: https:// only where the API serves HTTPS."
        )
    log.warning("upstream TLS failure: %s", message)
    return UpstreamError("upstream_tls", message)


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
    if 300 <= status < 400:
        return _redirect_error(response, config)
    detail = await _error_detail(response, config)
    said = _said(detail)
    if status == 401 or status == 403:
        where = provider.api_key_env or "the provider's API key"
        log.warning(
            "the model API (%s) rejected the API key (HTTP %d): check %s and restart Rill", provider.name, status, where
        )
        # With access tokens visitors cannot fix it (nor need to know where the key lives);
        # without them this is a local, single-user run: the visitor is the operator.
        advice = "Please tell whoever runs this Rill." if config.access.required else f"Check {where} and restart Rill."
        return UpstreamError(
            "upstream_auth",
            f"The model API rejected this server's API key (HTTP {status}). {advice}{said}",
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


def _clean_detail(text: str, config: Config, *, limit: int = _DETAIL_MAX) -> str:
    """One line without control characters, secrets removed (no key cut in half), kept short."""
    return shown(text, config.secrets, limit)


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


def _finish_reason(saw_done: bool, finish_reason: str | None, config: Config) -> str:
    """How the answer ended, or why it counts as cut."""
    if finish_reason is not None and finish_reason not in KNOWN_FINISH_REASONS:
        finish_reason = _clean_detail(finish_reason, config, limit=_FINISH_MAX) or None
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
                if (chunk := loads_fast(line)) is not None:
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
                chunk = loads(event.data)
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


# The reasons an answer commonly ends with (OpenAI's), passed on without a second look.
KNOWN_FINISH_REASONS = frozenset({"stop", "length", "content_filter", "tool_calls", "function_call"})
# Reasons that say the answer failed: vLLM's `abort`, `error` without an error object, and
# an upstream's own `cancelled`, which must not pass for the user's Stop (Rill's `cancelled`).
ABORT_FINISH_REASONS = frozenset({"abort", "aborted", "error", "cancelled", "canceled"})


def _finish(reason: str) -> str:
    """The finish reason for `done`, or the error it stands for. A reason Rill does not
    know (tool_calls, vendor-specific ones) is passed on verbatim: never turned into
    `stop`, which would make an answer that ended for another reason look complete."""
    if reason in KNOWN_FINISH_REASONS:
        return reason
    if reason == "insufficient_system_resource":
        raise UpstreamError(
            "upstream_overloaded",
            "The model ran out of resources before finishing. The text so far is kept; try again in a moment.",
            retryable=True,
        )
    if reason.lower() in ABORT_FINISH_REASONS:
        raise UpstreamError(
            "upstream_aborted",
            f"The model API broke off the answer (finish reason “{reason}”). The text so far is kept; try again.",
            retryable=True,
        )
    return reason


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
