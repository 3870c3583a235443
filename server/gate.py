"""Access tokens and the session cookies made from them.

A token is checked against every configured token in constant time. A session cookie
is `v1.<name>.<expires>.<signature>`, signed with a key derived from that token: there
is no extra secret to keep, a restart keeps everyone signed in, and removing a token
from the config signs out every browser that used it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass

from .clients import RateWindow
from .config import AccessConfig

_COOKIE_KEY_LABEL = b"rill session cookie v1"


@dataclass(frozen=True, slots=True)
class Session:
    name: str  # the access token's name
    expires: int  # Unix time


def _bytes(text: str) -> bytes:
    # Text from a client may hold lone surrogates (JSON allows them); never fail on it.
    return text.encode("utf-8", "surrogatepass")


class Gate:
    def __init__(self, config: AccessConfig) -> None:
        self.config = config
        self._digests = [(t.name, hashlib.sha256(_bytes(t.secret.reveal())).digest()) for t in config.tokens]
        self._cookie_keys = {
            t.name: hmac.new(_bytes(t.secret.reveal()), _COOKIE_KEY_LABEL, hashlib.sha256).digest()
            for t in config.tokens
        }
        self.session_seconds = max(60, int(config.session_days * 86400))
        self.failures = RateWindow(config.failed_sign_ins_per_minute)  # wrong tokens per client

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
        return Session(name, int(now) + self.session_seconds)

    def cookie_value(self, session: Session) -> str:
        return f"v1.{session.name}.{session.expires}.{self._signature(session.name, session.expires)}"

    def verify(self, value: str, now: float) -> Session | None:
        """The session a cookie stands for, or None if it is forged, expired or its token is gone."""
        parts = value.split(".")
        if len(parts) != 4 or parts[0] != "v1":
            return None
        _, name, expires_text, signature = parts
        if name not in self._cookie_keys or not (expires_text.isascii() and expires_text.isdigit()):
            return None
        expires = int(expires_text)
        # The second test ends sessions made under a longer session_days at once.
        if expires <= now or expires > now + self.session_seconds + 60:
            return None
        if not hmac.compare_digest(_bytes(signature), _bytes(self._signature(name, expires))):
            return None
        return Session(name, expires)

    def needs_renewal(self, session: Session, now: float) -> bool:
        """Past half its life: a browser in use stays signed in without asking again."""
        return session.expires - now < self.session_seconds / 2

    def _signature(self, name: str, expires: int) -> str:
        mac = hmac.new(self._cookie_keys[name], f"v1.{name}.{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")
