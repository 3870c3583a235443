"""Access tokens and the session cookies made from them.

A token is checked against every configured token in constant time. A session cookie
is `v1.<name>.<expires>.<session id>.<signature>`, signed with a key derived (scrypt)
from that token: there is no extra secret to keep, a restart keeps everyone signed in,
and removing a token from the config signs out every browser that used it. The slow
derivation makes guessing a token offline from a stolen cookie expensive. Sessions end
at a fixed time (no renewal), or earlier by signing out, which revokes that session id.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from server.access.clients import RateWindow
from server.config import AccessConfig
from server.ops.state import load_state, save_state

_COOKIE_KEY_SALT = b"rill session cookie v1:"
REVOKED_FILE = "revoked-sessions.json"
MAX_REVOKED = 100_000  # sign-outs remembered until their cookies expire; the oldest go first
_MAX_EXPIRES_DIGITS = 12  # Unix time; longer is forged (and int() of huge strings is slow)


@dataclass(frozen=True, slots=True)
class Session:
    name: str  # the access token's name
    expires: int  # Unix time
    session_id: str


def _bytes(text: str) -> bytes:
    # Text from a client may hold lone surrogates (JSON allows them); never fail on it.
    return text.encode("utf-8", "surrogatepass")


def _cookie_key(name: str, secret: str) -> bytes:
    return hashlib.scrypt(_bytes(secret), salt=_COOKIE_KEY_SALT + name.encode(), n=2**14, r=8, p=1, dklen=32)


class Gate:
    def __init__(self, config: AccessConfig) -> None:
        self.config = config
        self._digests = [(t.name, hashlib.sha256(_bytes(t.secret.reveal())).digest()) for t in config.tokens]
        self._cookie_keys = {t.name: _cookie_key(t.name, t.secret.reveal()) for t in config.tokens}
        self.session_seconds = max(60, int(config.session_days * 86400))
        self.failures = RateWindow(config.failed_sign_ins_per_minute)  # wrong tokens per client
        self._revoked_path = config.state_dir / REVOKED_FILE if config.state_dir and config.tokens else None
        # session id -> when its cookie expires anyway
        self._revoked: dict[str, int] = load_state(self._revoked_path, _parse_revoked) or {}
        self.on_revoke: Callable[[Session], None] | None = None  # shared mode: tells the other processes

    @property
    def required(self) -> bool:
        return self.config.required

    def check_token(self, given: str) -> str | None:
        """The name of the token `given` matches, or None.

        Compares fixed-size digests with every token, without stopping at a match, so
        the time taken says nothing about the token or which one matched."""
        digest = hashlib.sha256(_bytes(given)).digest()
        found = None
        for name, expected in self._digests:
            if hmac.compare_digest(digest, expected):
                found = name
        return found

    def issue(self, name: str, now: float) -> Session:
        return Session(name, int(now) + self.session_seconds, secrets.token_urlsafe(12))

    def cookie_value(self, session: Session) -> str:
        payload = f"v1.{session.name}.{session.expires}.{session.session_id}"
        return f"{payload}.{self._signature(session.name, payload)}"

    def verify(self, value: str, now: float) -> Session | None:
        """The session a cookie stands for, or None if it is forged, expired, signed
        out, or its token is gone."""
        parts = value.split(".")
        if len(parts) != 5 or parts[0] != "v1":
            return None
        _, name, expires_text, session_id, signature = parts
        if name not in self._cookie_keys or not _is_number(expires_text):
            return None
        expires = int(expires_text)
        # The second test ends sessions made under a longer session_days at once.
        if expires <= now or expires > now + self.session_seconds + 60:
            return None
        payload = f"v1.{name}.{expires_text}.{session_id}"
        if not hmac.compare_digest(_bytes(signature), _bytes(self._signature(name, payload))):
            return None
        if session_id in self._revoked:
            return None
        return Session(name, expires, session_id)

    def revoke(self, session: Session, now: float) -> None:
        """Signs a session out for good, even if a copy of its cookie is still around."""
        self._remember([(session.session_id, session.expires)], now)
        if self.on_revoke is not None:
            self.on_revoke(session)

    def revoked_elsewhere(self, revoked: Iterable[tuple[str, int]], now: float) -> int:
        """Sessions another process signed out (shared mode); how many were new here."""
        new = [(sid, expires) for sid, expires in revoked if expires > now and sid not in self._revoked]
        if new:
            self._remember(new, now)
        return len(new)

    def _remember(self, revoked: list[tuple[str, int]], now: float) -> None:
        self._revoked = {sid: expires for sid, expires in self._revoked.items() if expires > now}
        self._revoked.update(revoked)
        while len(self._revoked) > MAX_REVOKED:
            del self._revoked[next(iter(self._revoked))]
        save_state(self._revoked_path, self._revoked)

    def _signature(self, name: str, payload: str) -> str:
        mac = hmac.new(self._cookie_keys[name], payload.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")


def _parse_revoked(saved: Any) -> dict[str, int]:
    if not isinstance(saved, dict) or not all(isinstance(k, str) and type(v) is int for k, v in saved.items()):
        raise ValueError("not an object of session ids and expiry times")
    return dict(saved)


def _is_number(text: str) -> bool:
    return 0 < len(text) <= _MAX_EXPIRES_DIGITS and text.isascii() and text.isdigit()
