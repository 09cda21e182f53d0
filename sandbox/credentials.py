"""Per-attempt task tokens: minted on the host, checked by the gateway, revoked at the end.

A task token is what a sandbox holds instead of a real secret (it is the agent's
`OPENAI_API_KEY`). It names one attempt of one task and the scopes it was granted::

    sft1.<kid>.<b64url(payload JSON)>.<b64url(HMAC-SHA256(key[kid], "sft1.<kid>.<payload>"))>

payload: ``v`` (1), ``kid``, ``aud``, ``team``, ``batch``, ``task``, ``attempt``, ``scp``
(scopes), ``iat``, ``nbf``, ``exp`` (= the task's deadline), ``jti`` (unique id), all
times whole UNIX seconds. The key id sits outside the payload too, so the MAC is checked
before any JSON is parsed.

Scopes: ``llm:invoke`` (call the LLM endpoint) and ``egress:HOST[:PORT]`` (the proxy may
connect there; ``*.example.com`` matches any subdomain; no port means 80 and 443).

`TaskCredentials.verify` checks, in this order, and refuses with `CredentialError`:
length cap, shape, known key id, constant-time MAC, payload, audience, time window (a
small skew for a host clock behind the issuer's), the attempt still live and the token id
the one issued for it, the token arriving on that attempt's own socket (channel
binding), the scope granted. Messages never contain the token.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from hashlib import sha256
from typing import Any, Final

from accounting.errors import CredentialError

__all__ = [
    "AUDIENCE",
    "MAX_TOKEN_CHARS",
    "SCOPE_LLM",
    "AttemptRef",
    "KeyRing",
    "TaskCredentials",
    "TokenClaims",
    "egress_scope",
    "encode_token",
    "scope_granted",
    "split_host_port",
]

PREFIX: Final = "sft1"
AUDIENCE: Final = "sandfleet-gateway"
MAX_TOKEN_CHARS: Final = 4096
SCOPE_LLM: Final = "llm:invoke"
DEFAULT_SKEW_S: Final = 5
_DEFAULT_PORTS: Final = (80, 443)
_KID = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_B64 = re.compile(r"^[A-Za-z0-9_-]+$")
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_PATTERN = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})*(:\d{{1,5}})?$")


@dataclass(frozen=True, slots=True)
class AttemptRef:
    """One attempt of one task: who owns a socket, a token and a budget reservation."""

    team: str
    batch: str
    task: str
    attempt: int

    def __str__(self) -> str:
        return f"{self.team}/{self.batch}/{self.task}#{self.attempt}"


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """A verified token's payload."""

    kid: str
    aud: str
    ref: AttemptRef
    scopes: tuple[str, ...]
    iat: int
    nbf: int
    exp: int
    jti: str


# --- scopes -----------------------------------------------------------------------------


def split_host_port(target: str, default_port: int | None = None) -> tuple[str, int | None]:
    """`host[:port]` or `[v6]:port` -> (lowercase host without trailing dot, port)."""
    target = target.strip()
    if target.startswith("["):
        host, _, rest = target[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif target.count(":") == 1:
        host, _, port_text = target.partition(":")
    else:
        host, port_text = target, ""
    port: int | None = default_port
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"{target!r} has an invalid port")
        port = int(port_text)
    return host.lower().rstrip("."), port


def egress_scope(pattern: str) -> str:
    """The scope granting egress to an allowlist entry (`host`, `host:port`, `*.domain`)."""
    p = pattern.strip().lower()
    if not _PATTERN.match(p):
        raise CredentialError(
            f"egress allowlist entry {pattern!r} is not a host pattern "
            "(fix: write it like api.example.com, api.example.com:8443 or *.example.com)"
        )
    return f"egress:{p}"


def _egress_allows(pattern: str, host: str, port: int) -> bool:
    phost, pport = split_host_port(pattern)
    ports = (pport,) if pport is not None else _DEFAULT_PORTS
    if port not in ports:
        return False
    if phost.startswith("*."):
        suffix = phost[1:]  # ".example.com"
        return host.endswith(suffix) and len(host) > len(suffix)
    return host == phost


def scope_granted(granted: Iterable[str], wanted: str) -> bool:
    """Whether `wanted` (`llm:invoke`, `egress:host:port`) is covered by `granted`.

    Pure. An egress request must name a port; a granted egress pattern without one
    covers ports 80 and 443 only; `*.example.com` covers subdomains, not the apex.
    """
    if not wanted.startswith("egress:"):
        return wanted in set(granted)
    try:
        host, port = split_host_port(wanted[len("egress:") :])
    except ValueError:
        return False
    if port is None or not host:
        return False
    return any(
        _egress_allows(g[len("egress:") :], host, port) for g in granted if g.startswith("egress:")
    )


def _check_scope(scope: str) -> str:
    if scope == SCOPE_LLM:
        return scope
    if scope.startswith("egress:"):
        return egress_scope(scope[len("egress:") :])
    raise CredentialError(
        f"unknown scope {scope!r} (fix: use {SCOPE_LLM!r} or 'egress:HOST[:PORT]')"
    )


# --- keys and encoding --------------------------------------------------------------------


class KeyRing:
    """HMAC keys by key id: one active (used to mint), older ones verify until retired."""

    def __init__(self, keys: Mapping[str, bytes] | None = None, active: str | None = None):
        self._keys: dict[str, bytes] = {}
        self._active: str | None = None
        self._lock = threading.Lock()
        for kid, key in (keys or {}).items():
            self.add(kid, key)
        if active is not None:
            self.activate(active)

    def add(self, kid: str, key: bytes) -> None:
        """Add a key (at least 32 bytes). The first key added becomes the active one."""
        if not _KID.match(kid):
            raise CredentialError(f"key id {kid!r} must be 1-32 letters, digits, '-' or '_'")
        if len(key) < 32:
            raise CredentialError(f"key {kid!r} is {len(key)} bytes; use at least 32 random bytes")
        with self._lock:
            self._keys[kid] = bytes(key)
            if self._active is None:
                self._active = kid

    def activate(self, kid: str) -> None:
        with self._lock:
            if kid not in self._keys:
                raise CredentialError(f"cannot activate unknown key id {kid!r}; add it first")
            self._active = kid

    def rotate(self) -> str:
        """Generate a fresh random key, make it active, return its id."""
        kid = "k" + secrets.token_hex(6)
        self.add(kid, os.urandom(32))
        self.activate(kid)
        return kid

    def retire(self, kid: str) -> None:
        """Forget a key: tokens signed with it stop verifying. The active key cannot go."""
        with self._lock:
            if kid == self._active:
                raise CredentialError(f"key {kid!r} is the active key; rotate() before retiring it")
            self._keys.pop(kid, None)

    def active(self) -> tuple[str, bytes]:
        with self._lock:
            if self._active is None:
                raise CredentialError("the key ring is empty; call rotate() to create a key")
            return self._active, self._keys[self._active]

    def get(self, kid: str) -> bytes | None:
        with self._lock:
            return self._keys.get(kid)


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    if not _B64.match(text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, signed: str) -> bytes:
    return hmac.new(key, signed.encode("ascii"), sha256).digest()


def encode_token(kid: str, key: bytes, payload: bytes) -> str:
    """Sign raw payload bytes with `key` (pure; `TaskCredentials.mint` builds the payload)."""
    signed = f"{PREFIX}.{kid}.{_b64e(payload)}"
    return f"{signed}.{_b64e(_mac(key, signed))}"


def _refuse(why: str) -> CredentialError:
    return CredentialError(f"task token refused: {why}")


def _claims_from(payload: Any, kid: str) -> TokenClaims:
    if not isinstance(payload, dict):
        raise _refuse("its payload is not a JSON object (fix: use the token the host minted)")
    try:
        ref = AttemptRef(
            team=payload["team"],
            batch=payload["batch"],
            task=payload["task"],
            attempt=payload["attempt"],
        )
        claims = TokenClaims(
            kid=payload["kid"],
            aud=payload["aud"],
            ref=ref,
            scopes=tuple(payload["scp"]),
            iat=payload["iat"],
            nbf=payload["nbf"],
            exp=payload["exp"],
            jti=payload["jti"],
        )
    except (KeyError, TypeError) as e:
        raise _refuse(f"its payload lacks a field ({e}); use the token the host minted") from None
    strs = (ref.team, ref.batch, ref.task, claims.kid, claims.aud, claims.jti, *claims.scopes)
    ints = (ref.attempt, claims.iat, claims.nbf, claims.exp)
    if payload.get("v") != 1 or not all(isinstance(s, str) for s in strs):
        raise _refuse("its payload has a wrong version or field type")
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in ints):
        raise _refuse("its payload has a non-integer time or attempt")
    if claims.kid != kid:
        raise _refuse("its payload names another key id than its header")
    return claims


@dataclass(frozen=True, slots=True)
class _Live:
    claims: TokenClaims


class TaskCredentials:
    """Mints, verifies and revokes task tokens. Thread-safe; holds the live registry.

    `clock` returns UNIX seconds (float); tests pass a fake one.
    """

    def __init__(
        self,
        keys: KeyRing | None = None,
        *,
        audience: str = AUDIENCE,
        skew_s: int = DEFAULT_SKEW_S,
        clock: Callable[[], float] = time.time,
    ):
        self.keys = keys if keys is not None else KeyRing()
        if keys is None:
            self.keys.rotate()
        self.audience = audience
        self.skew_s = skew_s
        self._clock = clock
        self._live: dict[AttemptRef, _Live] = {}
        self._lock = threading.Lock()

    # -- issuing -------------------------------------------------------------------------

    def mint(
        self,
        ref: AttemptRef,
        scopes: Iterable[str],
        *,
        deadline: float,
        not_before: float | None = None,
    ) -> str:
        """A fresh token for `ref`; it supersedes any earlier token of the same attempt."""
        now = int(self._clock())
        exp = int(deadline)
        if exp <= now:
            raise CredentialError(
                f"cannot mint a token for {ref}: its deadline {exp} is not after now ({now}); "
                "give the task a deadline in the future"
            )
        scp = tuple(dict.fromkeys(_check_scope(s) for s in scopes))
        kid, key = self.keys.active()
        claims = TokenClaims(
            kid=kid,
            aud=self.audience,
            ref=ref,
            scopes=scp,
            iat=now,
            nbf=int(not_before) if not_before is not None else now,
            exp=exp,
            jti=secrets.token_urlsafe(16),
        )
        payload = {
            "v": 1,
            "kid": kid,
            "aud": claims.aud,
            "team": ref.team,
            "batch": ref.batch,
            "task": ref.task,
            "attempt": ref.attempt,
            "scp": list(scp),
            "iat": claims.iat,
            "nbf": claims.nbf,
            "exp": claims.exp,
            "jti": claims.jti,
        }
        raw = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
        with self._lock:
            self._live[ref] = _Live(claims)
        return encode_token(kid, key, raw)

    def revoke(self, ref: AttemptRef) -> None:
        """End the attempt's token before its expiry (attempt finished, killed or lost)."""
        with self._lock:
            self._live.pop(ref, None)

    def live_claims(self, ref: AttemptRef) -> TokenClaims | None:
        """The claims of the token currently issued to `ref`, or None when not live."""
        with self._lock:
            live = self._live.get(ref)
        if live is None or self._clock() >= live.claims.exp:
            return None
        return live.claims

    # -- checking ------------------------------------------------------------------------

    def verify(self, token: object, *, channel: AttemptRef, scope: str) -> TokenClaims:
        """The token's claims if every check passes, else `CredentialError` (see module doc)."""
        if not isinstance(token, str) or not token:
            raise _refuse("no token (fix: send `Authorization: Bearer $OPENAI_API_KEY`)")
        if len(token) > MAX_TOKEN_CHARS:
            raise _refuse(f"longer than {MAX_TOKEN_CHARS} characters")
        parts = token.split(".")
        if len(parts) != 4 or parts[0] != PREFIX or not all(parts):
            raise _refuse("not a sandfleet task token (expected sft1.<kid>.<payload>.<mac>)")
        _, kid, payload_b64, sig_b64 = parts
        key = self.keys.get(kid) if _KID.match(kid) else None
        if key is None:
            raise _refuse("signed with an unknown or retired key; the attempt needs a new token")
        try:
            sig = _b64d(sig_b64)
        except (ValueError, binascii.Error):
            raise _refuse("its signature is not base64url") from None
        if not hmac.compare_digest(sig, _mac(key, f"{PREFIX}.{kid}.{payload_b64}")):
            raise _refuse("its signature does not match (forged or edited)")
        try:
            payload = json.loads(_b64d(payload_b64))
        except (ValueError, binascii.Error):
            raise _refuse("its payload is not base64url JSON") from None
        claims = _claims_from(payload, kid)
        if claims.aud != self.audience:
            raise _refuse(f"it is meant for {claims.aud!r}, not {self.audience!r}")
        self._check_time(claims)
        with self._lock:
            live = self._live.get(claims.ref)
        if live is None:
            raise _refuse(f"attempt {claims.ref} is not live (ended, revoked or never started)")
        if not hmac.compare_digest(live.claims.jti, claims.jti):
            raise _refuse(f"superseded: attempt {claims.ref} was issued a newer token")
        if claims.ref != channel:
            raise _refuse(f"it belongs to attempt {claims.ref}, not to this socket's attempt")
        if not scope_granted(claims.scopes, scope):
            raise _refuse(f"scope {scope!r} was not granted to attempt {claims.ref}")
        return claims

    def _check_time(self, claims: TokenClaims) -> None:
        now = self._clock()
        if now + self.skew_s < claims.nbf or now + self.skew_s < claims.iat:
            raise _refuse(f"not valid before {claims.nbf} (now {int(now)}); check the host clock")
        if now >= claims.exp:
            raise _refuse(f"expired at {claims.exp} (now {int(now)}): the task's deadline passed")

    def check_channel(self, channel: AttemptRef, scope: str) -> TokenClaims:
        """For requests that carry no token (the egress proxy): the socket's attempt must be
        live and its issued token must grant `scope`."""
        claims = self.live_claims(channel)
        if claims is None:
            raise _refuse(f"attempt {channel} is not live (ended, revoked or expired)")
        if not scope_granted(claims.scopes, scope):
            raise _refuse(f"scope {scope!r} was not granted to attempt {channel}")
        return claims
