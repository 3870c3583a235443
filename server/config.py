"""Load and validate Rill's configuration: config.toml, environment, .env, credentials.

Everything here is parsed once at start-up into frozen dataclasses; the rest of the
code never reads the environment or the file system for settings.
"""

from __future__ import annotations

import functools
import math
import os
import re
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from pathlib import Path
from typing import Any, TypeVar

from yarl import URL

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "config.toml"


class ConfigError(Exception):
    """A setting is missing or wrong; the message names the key and the problem."""


class Secret:
    """A value that must never be printed: repr and str hide it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    id: str  # Rill's public id, unique across providers
    upstream_id: str  # the name the upstream API knows it by
    label: str
    reasoning: bool
    extra: Mapping[str, Any] = field(default_factory=dict)  # merged into the request body


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    name: str
    label: str
    base_url: URL
    api_key_env: str
    requires_key: bool
    models: tuple[ModelConfig, ...]
    api_key: Secret | None = None
    demo: bool = False
    # Joined once, not per answer (a yarl join parses and normalises the path each time).
    completions_url: URL = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "completions_url", self.base_url / "chat/completions")

    @property
    def usable(self) -> bool:
        return self.api_key is not None or not self.requires_key


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    shutdown_timeout: float = 15.0
    drain_delay: float = 0.0  # seconds not ready but still serving after SIGTERM, before the listener closes
    drain_timeout: float = 0.0  # then, listener closed, seconds answers in flight may take to finish
    header_timeout: float = 10.0  # a request's headers, from connect (or its first byte after keep-alive)
    body_timeout: float = 30.0  # a request's whole body, from the end of its headers
    keepalive_timeout: float = 75.0  # an idle keep-alive connection between requests
    max_connections: int = 4096  # open client connections in total
    max_connections_per_address: int = 64  # per client address (IPv6: per /64); trusted proxies exempt


@dataclass(frozen=True)
class TimeoutConfig:
    connect: float = 10.0
    idle_read: float = 60.0
    first_token: float = 180.0
    max_generation: float = 900.0


@dataclass(frozen=True)
class StreamConfig:
    heartbeat_interval: float = 15.0
    liveness_interval: float = 0.5
    retry_ms: int = 3000
    resume_grace: float = 15.0
    finished_ttl: float = 600.0
    buffer_memory_mb: float = 64.0
    send_timeout: float = 30.0


@dataclass(frozen=True)
class LimitsConfig:
    max_body_bytes: int = 1_048_576
    max_messages: int = 200
    max_message_chars: int = 100_000
    max_total_chars: int = 400_000
    max_tokens: int = 32_768
    # Bytes one answer may take from the model API (its stream, decompressed); 0: derived
    # from the request's max_tokens (see upstream.answer_limit).
    max_answer_bytes: int = 0
    max_concurrent_per_client: int = 4
    max_concurrent_total: int = 64
    max_streams_per_client: int = 16  # open event streams per client
    generations_per_minute: int = 20  # new answers per client per minute
    # Whose X-Forwarded-For is believed: the reverse proxy in front of Rill.
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...] = (ip_network("127.0.0.1/32"), ip_network("::1/128"))


@dataclass(frozen=True, slots=True)
class AccessToken:
    name: str  # shown in logs and used for limits and budgets; the secret never is
    secret: Secret


@dataclass(frozen=True)
class AccessConfig:
    tokens: tuple[AccessToken, ...] = ()  # none: open to anyone who can reach the port
    tokens_env: str = "RILL_ACCESS_TOKENS"
    session_days: float = 30.0
    failed_sign_ins_per_minute: int = 5
    daily_token_budget: int = 0  # model tokens per access token per UTC day; 0: no budget
    cors_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()  # Host names served without tokens besides loopback ones
    state_dir: Path | None = None  # where sign-outs and the budget ledger survive restarts
    state_dir_from: str = ""  # what chose state_dir, for messages

    @property
    def required(self) -> bool:
        return bool(self.tokens)

    @property
    def keeps_state(self) -> bool:
        """Whether anything goes into state_dir: sign-outs (with tokens) or the budget ledger."""
        return self.state_dir is not None and (self.required or self.daily_token_budget > 0)


@dataclass(frozen=True)
class UpstreamConfig:
    retries: int = 2
    retry_backoff: float = 0.5
    max_retry_after: float = 10.0
    max_line_chars: int = 1_048_576
    max_event_chars: int = 2 * 1_048_576  # one event's data lines together; 0 in the file: twice max_line_chars


@dataclass(frozen=True)
class DemoConfig:
    tokens_per_second: float = 30.0
    reasoning_tokens_per_second: float = 80.0


@dataclass(frozen=True)
class CompatConfig:
    get_stream: bool = False


@dataclass(frozen=True)
class StorageConfig:
    """Conversations kept on the server ([storage]). `url` is resolved: the file's or
    RILL_DATABASE_URL's, else a SQLite file in the state directory; "" only when there is
    no state directory to put it in, and then `enabled` is False."""

    enabled: bool = True
    url: str = field(default="", repr=False)  # may hold a PostgreSQL password
    url_from: str = ""  # what chose the url, for messages
    save_interval: float = 2.0  # seconds between two writes of an answer in progress
    auto_titles: bool = True
    keep_unread: bool = True  # a stored answer runs to its end with nobody reading it
    max_conversations: int = 10_000  # per owner
    max_messages: int = 250_000  # per owner
    max_bytes: int = 1_073_741_824  # per owner: content + reasoning, UTF-8
    max_message_chars: int = LimitsConfig.max_message_chars

    @property
    def backend(self) -> str:
        return "postgresql" if self.url.startswith("postgres") else "sqlite"

    @property
    def shown_url(self) -> str:
        """The url without its password, for logs and messages."""
        return _without_password(self.url)

    @property
    def password(self) -> str:
        try:
            return URL(self.url).password or ""
        except ValueError:
            return ""


@dataclass(frozen=True)
class ClusterConfig:
    """Shared mode ([cluster]): processes that serve one set of answers through Redis.
    `redis_url` "" (the default): one process, everything in its memory."""

    redis_url: str = field(default="", repr=False)  # may hold a password
    url_from: str = ""  # what chose the url, for messages
    # Seconds between an owner's writes to Redis at most: readers on other processes get
    # events up to this much later than local ones, for fewer writes (CPU) under load.
    write_interval: float = 0.01

    @property
    def enabled(self) -> bool:
        return bool(self.redis_url)

    @property
    def shown_url(self) -> str:
        """The url without its password, for logs and messages."""
        return _without_password(self.redis_url)

    @property
    def password(self) -> str:
        try:
            return URL(self.redis_url).password or ""
        except ValueError:
            return ""


@dataclass(frozen=True, slots=True)
class Config:
    providers: tuple[ProviderConfig, ...]
    default_model: str
    server: ServerConfig = ServerConfig()
    timeouts: TimeoutConfig = TimeoutConfig()
    stream: StreamConfig = StreamConfig()
    limits: LimitsConfig = LimitsConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    demo: DemoConfig = DemoConfig()
    compat: CompatConfig = CompatConfig()
    access: AccessConfig = AccessConfig()
    storage: StorageConfig = StorageConfig(enabled=False)
    cluster: ClusterConfig = ClusterConfig()

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every secret value, for scrubbing text that came from outside."""
        keys = tuple(p.api_key.reveal() for p in self.providers if p.api_key)
        passwords = tuple(word for word in (self.storage.password, self.cluster.password) if word)
        return keys + tuple(token.secret.reveal() for token in self.access.tokens) + passwords


# --- reading the TOML document -------------------------------------------------------

T = TypeVar("T")


class _Section:
    """A TOML table that remembers its dotted path and rejects unknown keys."""

    def __init__(self, data: Mapping[str, Any], path: str) -> None:
        self._data = data
        self._path = path
        self._seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path else name

    def get(self, name: str, kind: type[T], default: T) -> T:
        self._seen.add(name)
        if name not in self._data:
            return default
        return _check_type(self._data[name], kind, self.key(name))

    def require(self, name: str, kind: type[T]) -> T:
        self._seen.add(name)
        if name not in self._data:
            raise ConfigError(f"{self.key(name)}: required setting is missing")
        return _check_type(self._data[name], kind, self.key(name))

    def table(self, name: str) -> _Section:
        return _Section(self.get(name, dict, {}), self.key(name))

    def tables(self, name: str) -> list[_Section]:
        items = self.get(name, list, [])
        sections = []
        for index, item in enumerate(items):
            path = f"{self.key(name)}[{index}]"
            if not isinstance(item, dict):
                raise ConfigError(f"{path}: must be a table")
            sections.append(_Section(item, path))
        return sections

    def finish(self) -> None:
        unknown = sorted(set(self._data) - self._seen)
        if unknown:
            raise ConfigError(f"{self.key(unknown[0])}: unknown setting (check the spelling)")


def _check_type(value: Any, kind: type[T], key: str) -> T:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # type: ignore[return-value]
    if kind is int and isinstance(value, bool):
        raise ConfigError(f"{key}: must be an integer, not a boolean")
    if not isinstance(value, kind):
        raise ConfigError(f"{key}: must be {_KIND_NAMES.get(kind, kind.__name__)}, got {value!r}")
    return value


_KIND_NAMES: dict[type, str] = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    dict: "a table",
    list: "a list",
}


def _positive(section: _Section, name: str, default: float) -> float:
    value = section.get(name, float, default)
    if value <= 0:
        raise ConfigError(f"{section.key(name)}: must be greater than 0, got {value}")
    return value


def _not_negative(section: _Section, name: str, default: float) -> float:
    value = section.get(name, float, default)
    if not value >= 0:  # also refuses NaN
        raise ConfigError(f"{section.key(name)}: must be 0 or more, got {value}")
    return value


def _positive_int(section: _Section, name: str, default: int) -> int:
    value = section.get(name, int, default)
    if value <= 0:
        raise ConfigError(f"{section.key(name)}: must be greater than 0, got {value}")
    return value


def _zero_or_more_int(section: _Section, name: str, default: int) -> int:
    value = section.get(name, int, default)
    if value < 0:
        raise ConfigError(f"{section.key(name)}: must be 0 or more, got {value}")
    return value


def _networks(
    section: _Section, name: str, default: tuple[IPv4Network | IPv6Network, ...]
) -> tuple[IPv4Network | IPv6Network, ...]:
    items = section.get(name, list, [str(n) for n in default])
    networks = []
    for index, item in enumerate(items):
        key = f"{section.key(name)}[{index}]"
        if not isinstance(item, str):
            raise ConfigError(f'{key}: must be an address or network such as "10.0.0.0/8", got {item!r}')
        try:
            networks.append(ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(f"{key}: not an IP address or network: {item!r}") from None
    return tuple(networks)


def _base_url(text: str, key: str) -> URL:
    try:
        url = URL(text)
        url.port  # noqa: B018 - yarl checks the port lazily; make it fail here
    except ValueError:
        raise ConfigError(f"{key}: not a valid URL: {text!r}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(f"{key}: must be an http:// or https:// URL, got {text!r}")
    # `URL / "chat/completions"` needs a path without a trailing slash
    return url.with_path(url.path.rstrip("/")) if url.path != "/" else url.with_path("")


def _parse_models(provider: _Section) -> tuple[ModelConfig, ...]:
    models = []
    for section in provider.tables("models"):
        model_id = section.require("id", str)
        models.append(
            ModelConfig(
                id=model_id,
                upstream_id=section.get("upstream_id", str, model_id),
                label=section.get("label", str, model_id),
                reasoning=section.get("reasoning", bool, False),
                extra=section.get("extra", dict, {}),
            )
        )
        section.finish()
    if not models:
        raise ConfigError(f"{provider.key('models')}: a provider needs at least one model")
    return tuple(models)


def _parse_provider(section: _Section) -> ProviderConfig:
    provider = ProviderConfig(
        name=section.require("name", str),
        label=section.get("label", str, ""),
        base_url=_base_url(section.require("base_url", str), section.key("base_url")),
        api_key_env=section.get("api_key_env", str, ""),
        requires_key=section.get("requires_key", bool, True),
        models=_parse_models(section),
    )
    section.finish()
    return replace(provider, label=provider.label or provider.name)


def parse_config(document: Mapping[str, Any], environ: Mapping[str, str]) -> Config:
    """Build a Config from a parsed TOML document plus environment overrides."""
    root = _Section(document, "")

    server_section = root.table("server")
    server = ServerConfig(
        host=_host(environ.get("RILL_HOST"), server_section),
        port=_port(environ.get("RILL_PORT"), server_section),
        shutdown_timeout=_positive(server_section, "shutdown_timeout", ServerConfig.shutdown_timeout),
        drain_delay=_not_negative(server_section, "drain_delay", ServerConfig.drain_delay),
        drain_timeout=_drain_timeout(environ.get("RILL_DRAIN_TIMEOUT"), server_section),
        header_timeout=_positive(server_section, "header_timeout", ServerConfig.header_timeout),
        body_timeout=_positive(server_section, "body_timeout", ServerConfig.body_timeout),
        keepalive_timeout=_positive(server_section, "keepalive_timeout", ServerConfig.keepalive_timeout),
        max_connections=_positive_int(server_section, "max_connections", ServerConfig.max_connections),
        max_connections_per_address=_positive_int(
            server_section, "max_connections_per_address", ServerConfig.max_connections_per_address
        ),
    )
    server_section.finish()

    t = root.table("timeouts")
    timeouts = TimeoutConfig(
        connect=_positive(t, "connect", TimeoutConfig.connect),
        idle_read=_positive(t, "idle_read", TimeoutConfig.idle_read),
        first_token=_positive(t, "first_token", TimeoutConfig.first_token),
        max_generation=_positive(t, "max_generation", TimeoutConfig.max_generation),
    )
    t.finish()

    s = root.table("stream")
    stream = StreamConfig(
        heartbeat_interval=_positive(s, "heartbeat_interval", StreamConfig.heartbeat_interval),
        liveness_interval=_positive(s, "liveness_interval", StreamConfig.liveness_interval),
        retry_ms=_positive_int(s, "retry_ms", StreamConfig.retry_ms),
        resume_grace=_positive(s, "resume_grace", StreamConfig.resume_grace),
        finished_ttl=_positive(s, "finished_ttl", StreamConfig.finished_ttl),
        buffer_memory_mb=_positive(s, "buffer_memory_mb", StreamConfig.buffer_memory_mb),
        send_timeout=_positive(s, "send_timeout", StreamConfig.send_timeout),
    )
    s.finish()

    lim = root.table("limits")
    limits = LimitsConfig(
        max_body_bytes=_positive_int(lim, "max_body_bytes", LimitsConfig.max_body_bytes),
        max_messages=_positive_int(lim, "max_messages", LimitsConfig.max_messages),
        max_message_chars=_positive_int(lim, "max_message_chars", LimitsConfig.max_message_chars),
        max_total_chars=_positive_int(lim, "max_total_chars", LimitsConfig.max_total_chars),
        max_tokens=_positive_int(lim, "max_tokens", LimitsConfig.max_tokens),
        max_answer_bytes=_zero_or_more_int(lim, "max_answer_bytes", LimitsConfig.max_answer_bytes),
        max_concurrent_per_client=_positive_int(
            lim, "max_concurrent_per_client", LimitsConfig.max_concurrent_per_client
        ),
        max_concurrent_total=_positive_int(lim, "max_concurrent_total", LimitsConfig.max_concurrent_total),
        max_streams_per_client=_positive_int(lim, "max_streams_per_client", LimitsConfig.max_streams_per_client),
        generations_per_minute=_positive_int(lim, "generations_per_minute", LimitsConfig.generations_per_minute),
        trusted_proxies=_networks(lim, "trusted_proxies", LimitsConfig.trusted_proxies),
    )
    lim.finish()

    u = root.table("upstream")
    retries = u.get("retries", int, UpstreamConfig.retries)
    if retries < 0:
        raise ConfigError(f"{u.key('retries')}: must be 0 or more, got {retries}")
    max_line_chars = _positive_int(u, "max_line_chars", UpstreamConfig.max_line_chars)
    upstream = UpstreamConfig(
        retries=retries,
        retry_backoff=_positive(u, "retry_backoff", UpstreamConfig.retry_backoff),
        max_retry_after=_positive(u, "max_retry_after", UpstreamConfig.max_retry_after),
        max_line_chars=max_line_chars,
        max_event_chars=_zero_or_more_int(u, "max_event_chars", 0) or 2 * max_line_chars,
    )
    u.finish()

    d = root.table("demo")
    demo = DemoConfig(
        tokens_per_second=_positive(d, "tokens_per_second", DemoConfig.tokens_per_second),
        reasoning_tokens_per_second=_positive(d, "reasoning_tokens_per_second", DemoConfig.reasoning_tokens_per_second),
    )
    d.finish()

    c = root.table("compat")
    compat = CompatConfig(get_stream=c.get("get_stream", bool, CompatConfig.get_stream))
    c.finish()

    access = _parse_access(root.table("access"), environ)
    if not access.required and environ.get("RILL_REQUIRE_ACCESS_TOKENS", "") not in ("", "0"):
        raise ConfigError(
            f"{access.tokens_env}: no access tokens, and RILL_REQUIRE_ACCESS_TOKENS says this Rill needs them "
            "(it is set by the systemd unit: behind a proxy an open Rill would serve everyone)"
        )
    if not access.required and not is_loopback_host(server.host):
        raise ConfigError(
            f"server.host: {server.host!r} can be reached from other machines, so Rill needs access tokens: "
            f"put one or more in {access.tokens_env} (see the README, 'Access tokens'), or listen on 127.0.0.1"
        )

    storage = _parse_storage(root.table("storage"), environ, access, limits)
    cluster = _parse_cluster(root.table("cluster"), environ)

    providers = [_parse_provider(p) for p in root.tables("providers")]
    if not providers:
        raise ConfigError("providers: at least one [[providers]] table is required")
    default_model = root.get("default_model", str, providers[0].models[0].id)
    root.finish()

    providers = _apply_provider_overrides(providers, environ)
    _check_unique(providers)
    if model_override := environ.get("RILL_MODEL"):
        default_model = model_override
    known = {m.id for p in providers for m in p.models}
    if default_model not in known:
        raise ConfigError(f"default_model: {default_model!r} is not a model of any provider")

    return Config(
        providers=tuple(providers),
        default_model=default_model,
        server=server,
        timeouts=timeouts,
        stream=stream,
        limits=limits,
        upstream=upstream,
        demo=demo,
        compat=compat,
        access=access,
        storage=storage,
        cluster=cluster,
    )


_TOKEN_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}")
_TOKEN_SECRET = re.compile(r"[!-~]{16,256}")  # printable ASCII, no spaces
_TOKEN_MIN_DISTINCT = 8
_ORIGIN = re.compile(r"https?://[^/?#\s]+")


@functools.lru_cache(maxsize=64)  # asked per request, of the same few Host values
def is_loopback_host(host: str) -> bool:
    """Whether only this machine can reach `host` (a name or an address to listen on)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_access(section: _Section, environ: Mapping[str, str]) -> AccessConfig:
    tokens_env = section.get("tokens_env", str, AccessConfig.tokens_env)
    origins = section.get("cors_origins", list, [])
    for index, origin in enumerate(origins):
        if not isinstance(origin, str) or not _ORIGIN.fullmatch(origin):
            raise ConfigError(
                f'{section.key("cors_origins")}[{index}]: must be an origin such as "https://app.example.com" '
                f"(scheme and host, no path), got {origin!r}"
            )
    hosts = section.get("allowed_hosts", list, [])
    for index, host in enumerate(hosts):
        if not isinstance(host, str) or not host or any(c in host for c in "/: "):
            raise ConfigError(f'{section.key("allowed_hosts")}[{index}]: must be a host name such as "rill.lan"')
    state_dir, state_dir_from = _state_dir(environ)
    access = AccessConfig(
        tokens=parse_access_tokens(environ.get(tokens_env, ""), tokens_env) if tokens_env else (),
        tokens_env=tokens_env,
        session_days=_positive(section, "session_days", AccessConfig.session_days),
        failed_sign_ins_per_minute=_positive_int(
            section, "failed_sign_ins_per_minute", AccessConfig.failed_sign_ins_per_minute
        ),
        daily_token_budget=section.get("daily_token_budget", int, AccessConfig.daily_token_budget),
        cors_origins=tuple(o.rstrip("/").lower() for o in origins),
        allowed_hosts=tuple(h.lower() for h in hosts),
        state_dir=state_dir,
        state_dir_from=state_dir_from,
    )
    if access.daily_token_budget < 0:
        raise ConfigError(f"{section.key('daily_token_budget')}: must be 0 (no budget) or more")
    section.finish()
    return access


DATABASE_FILE = "rill.db"
_DATABASE_SCHEMES = ("sqlite", "postgresql", "postgres")


def _without_password(url: str) -> str:
    try:
        parsed = URL(url)
        return str(parsed.with_password("***")) if parsed.password else url
    except ValueError:
        return "(unparsable URL)"


def _database_url(text: str, key: str) -> str:
    scheme = text.partition(":")[0].partition("+")[0].lower()
    if scheme not in _DATABASE_SCHEMES or "://" not in text:
        raise ConfigError(
            f"{key}: must be a sqlite:///path/to/file.db or postgresql://user@host/database URL, "
            f"got {_without_password(text)!r}"
        )
    if scheme == "sqlite" and text.partition("://")[2] in ("", "/", "/:memory:"):
        raise ConfigError(f"{key}: a SQLite URL names a file, as in sqlite:////var/lib/rill/rill.db")
    return text


def _redis_url(text: str, key: str) -> str:
    scheme = text.partition("://")[0].lower()
    if scheme not in ("redis", "rediss", "unix") or "://" not in text:
        raise ConfigError(
            f"{key}: must be a redis://host:port/db (rediss:// for TLS, unix:///path) URL, "
            f"got {_without_password(text)!r}"
        )
    return text


WRITE_INTERVAL_MAX = 0.1  # seconds: longer would show as lag to readers on other processes


def _parse_cluster(section: _Section, environ: Mapping[str, str]) -> ClusterConfig:
    file_url = section.get("redis_url", str, "")
    interval = _positive(section, "write_interval", ClusterConfig.write_interval)
    if interval > WRITE_INTERVAL_MAX:
        raise ConfigError(f"{section.key('write_interval')}: at most {WRITE_INTERVAL_MAX} s, got {interval}")
    section.finish()
    if env_url := environ.get("RILL_REDIS_URL", ""):
        url, url_from = _redis_url(env_url, "RILL_REDIS_URL"), "RILL_REDIS_URL"
    elif file_url:
        url, url_from = _redis_url(file_url, section.key("redis_url")), section.key("redis_url")
    else:
        return ClusterConfig(write_interval=interval)
    return ClusterConfig(redis_url=url, url_from=url_from, write_interval=interval)


def _parse_storage(
    section: _Section, environ: Mapping[str, str], access: AccessConfig, limits: LimitsConfig
) -> StorageConfig:
    enabled = section.get("enabled", bool, True)
    file_url = section.get("url", str, "")
    if env_url := environ.get("RILL_DATABASE_URL", ""):
        url, url_from = _database_url(env_url, "RILL_DATABASE_URL"), "RILL_DATABASE_URL"
    elif file_url:
        url, url_from = _database_url(file_url, section.key("url")), section.key("url")
    elif access.state_dir is not None:
        url, url_from = f"sqlite:///{access.state_dir / DATABASE_FILE}", "the default, in the state directory"
    else:
        # Nowhere to keep it (no RILL_STATE_DIR, no HOME): the page keeps today's browser-only history.
        url, url_from, enabled = "", "", False
    storage = StorageConfig(
        enabled=enabled,
        url=url,
        url_from=url_from,
        save_interval=_positive(section, "save_interval", StorageConfig.save_interval),
        auto_titles=section.get("auto_titles", bool, StorageConfig.auto_titles),
        keep_unread=section.get("keep_unread", bool, StorageConfig.keep_unread),
        max_conversations=_positive_int(section, "max_conversations", StorageConfig.max_conversations),
        max_messages=_positive_int(section, "max_messages", StorageConfig.max_messages),
        max_bytes=_positive_int(section, "max_bytes", StorageConfig.max_bytes),
        max_message_chars=_positive_int(section, "max_message_chars", limits.max_message_chars),
    )
    section.finish()
    return storage


def uses_state_dir(config: Config) -> bool:
    """Whether the database is the default SQLite file in the state directory."""
    state_dir = config.access.state_dir
    return (
        config.storage.enabled
        and state_dir is not None
        and config.storage.url == f"sqlite:///{state_dir / DATABASE_FILE}"
    )


def parse_access_tokens(text: str, source: str) -> tuple[AccessToken, ...]:
    """One token per line or comma-separated, each `name:token` or a bare `token`.

    Error messages name the entry, never its secret."""
    entries = [e.strip() for e in re.split(r"[,\n]", text)]
    entries = [e for e in entries if e and not e.startswith("#")]
    tokens: list[AccessToken] = []
    for number, entry in enumerate(entries, 1):
        name, colon, secret = entry.partition(":")
        if not colon:
            name, secret = f"token{number}", entry
        where = f"{source}: entry {number}"
        if not _TOKEN_NAME.fullmatch(name):
            raise ConfigError(f"{where}: a name is 1 to 32 letters, digits, '_' or '-' (written name:token)")
        # Errors name the entry by its number only: a mistyped line may be all secret.
        if not _TOKEN_SECRET.fullmatch(secret) or ":" in secret:
            raise ConfigError(f"{where}: a token is 16 to 256 printable characters without spaces, commas or colons")
        if len(set(secret)) < _TOKEN_MIN_DISTINCT:
            raise ConfigError(
                f"{where}: the token is too easy to guess (fewer than {_TOKEN_MIN_DISTINCT} different characters); "
                "make one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        if any(t.name == name for t in tokens):
            raise ConfigError(f"{where}: the name {name!r} is used twice")
        if any(t.secret.reveal() == secret for t in tokens):
            raise ConfigError(f"{where}: the same token is listed twice")
        tokens.append(AccessToken(name, Secret(secret)))
    return tuple(tokens)


def _state_dir(environ: Mapping[str, str]) -> tuple[Path | None, str]:
    """RILL_STATE_DIR, else systemd's StateDirectory= (STATE_DIRECTORY, colon-separated
    when several), else the XDG state home: $XDG_STATE_HOME/rill or ~/.local/state/rill.
    Only the environment given is read, so a test's explicit environ never finds $HOME."""
    if value := environ.get("RILL_STATE_DIR"):
        return Path(value), "RILL_STATE_DIR"
    if value := environ.get("STATE_DIRECTORY", "").split(":")[0]:
        return Path(value), "STATE_DIRECTORY, from systemd's StateDirectory="
    # The XDG spec says to ignore a relative XDG_STATE_HOME.
    if (value := environ.get("XDG_STATE_HOME", "")).startswith("/"):
        return Path(value) / "rill", "the default, $XDG_STATE_HOME/rill"
    if (value := environ.get("HOME", "")).startswith("/"):
        return Path(value) / ".local/state/rill", "the default, ~/.local/state/rill"
    return None, ""


def prepare_state_dir(access: AccessConfig, *, database: bool = False) -> None:
    """Make the state directory if it is missing (0700, the XDG spec's mode) and prove
    that Rill can list it and write in it, when anything is to be kept there.

    Every failure is a ConfigError naming the directory: found at start-up, it is one
    clear line, not a traceback at the first sign-out or a budget that forgets."""
    path = access.state_dir
    if path is None or not (access.keeps_state or database):
        return

    def fail(problem: str, exc: OSError | None = None) -> ConfigError:
        reason = f" ({exc.strerror or exc})" if exc is not None else ""
        return ConfigError(
            f"state directory {str(path)!r} ({access.state_dir_from}) {problem}{reason}: Rill keeps sign-outs, "
            "the token budget and the conversations' database there; "
            "give it to the user Rill runs as, or set RILL_STATE_DIR to another directory"
        )

    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        raise fail("is not a directory") from None
    except OSError as exc:
        raise fail("cannot be created", exc) from None
    try:
        os.listdir(path)
    except NotADirectoryError:
        raise fail("is not a directory") from None
    except OSError as exc:
        raise fail("cannot be read", exc) from None
    # A real write, not os.access(), which answers for the real rather than the effective user.
    try:
        fd, probe = tempfile.mkstemp(prefix=".rill-write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise fail("is not writable", exc) from None


def _host(env_value: str | None, section: _Section) -> str:
    file_value = section.get("host", str, ServerConfig.host)  # type-checked even when overridden
    return env_value or file_value


def _drain_timeout(env_value: str | None, section: _Section) -> float:
    """[server] drain_timeout, or RILL_DRAIN_TIMEOUT (the unit of a process among several
    sets it: deploy/install.sh --workers)."""
    from_file = _not_negative(section, "drain_timeout", ServerConfig.drain_timeout)
    if not env_value:
        return from_file
    try:
        value = float(env_value)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"RILL_DRAIN_TIMEOUT: must be a number of seconds, 0 or more, got {env_value!r}")
    return value


def _port(env_value: str | None, section: _Section) -> int:
    if env_value:
        if not (env_value.isascii() and env_value.isdigit()) or not 0 <= int(env_value) <= 65535:
            raise ConfigError(f"RILL_PORT: must be a port number 0-65535, got {env_value!r}")
        section.get("port", int, 0)  # still type-check the file
        return int(env_value)
    port = section.get("port", int, ServerConfig.port)
    if not 0 <= port <= 65535:
        raise ConfigError(f"server.port: must be a port number 0-65535, got {port}")
    return port


def _apply_provider_overrides(providers: list[ProviderConfig], environ: Mapping[str, str]) -> list[ProviderConfig]:
    """RILL_UPSTREAM_URL / RILL_MODEL retarget the first (default) provider; keys come from env."""
    first = providers[0]
    if url := environ.get("RILL_UPSTREAM_URL"):
        # A hand-picked upstream (Ollama, llama.cpp, vLLM) often needs no key.
        first = replace(first, base_url=_base_url(url, "RILL_UPSTREAM_URL"), requires_key=False)
    if model := environ.get("RILL_MODEL"):
        first = replace(first, models=(ModelConfig(id=model, upstream_id=model, label=model, reasoning=False),))
    providers = [first, *providers[1:]]
    with_keys = []
    for provider in providers:
        key = environ.get(provider.api_key_env, "").strip() if provider.api_key_env else ""
        with_keys.append(replace(provider, api_key=Secret(key) if key else None))
    return with_keys


def _check_unique(providers: list[ProviderConfig]) -> None:
    seen: set[str] = set()
    for provider in providers:
        for model in provider.models:
            if model.id in seen:
                raise ConfigError(f"providers.models: model id {model.id!r} is defined twice")
            seen.add(model.id)


# --- gathering the environment -------------------------------------------------------


def read_dotenv(path: Path) -> dict[str, str]:
    """Parse a .env file: KEY=VALUE lines, optional `export`, quotes and # comments."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, _, value = line.partition("=")
        name = name.removeprefix("export ").strip()
        value = value.strip()
        if value[:1] in ("'", '"') and (end := value.find(value[0], 1)) > 0:
            value = value[1:end]  # a quoted value; whatever follows the closing quote is a comment
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        values[name] = value
    return values


def read_credentials(directory: str | None) -> dict[str, str]:
    """systemd's LoadCredential= files: the file name is the variable name."""
    values: dict[str, str] = {}
    if not directory:
        return values
    folder = Path(directory)
    if not folder.is_dir():
        return values
    for entry in folder.iterdir():
        if entry.is_file():
            values[entry.name] = entry.read_text(encoding="utf-8").strip()
    return values


def gather_environ(environ: Mapping[str, str], cwd: Path) -> dict[str, str]:
    """The process environment wins over credentials, which win over .env."""
    merged = read_dotenv(cwd / ".env")
    merged.update(read_credentials(environ.get("CREDENTIALS_DIRECTORY")))
    merged.update(environ)
    return merged


def load_config(environ: Mapping[str, str] | None = None, cwd: Path | None = None) -> Config:
    """Read the config file named by RILL_CONFIG (or the bundled one) and the environment."""
    env = gather_environ(os.environ if environ is None else environ, cwd or Path.cwd())
    path = Path(env.get("RILL_CONFIG") or DEFAULT_CONFIG_PATH)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"RILL_CONFIG: file {str(path)!r} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"RILL_CONFIG: cannot read {str(path)!r} ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    config = parse_config(document, env)
    prepare_state_dir(config.access, database=uses_state_dir(config))
    return config
