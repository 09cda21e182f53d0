"""Task tokens: every attack of issue 5 is refused with CredentialError, never a crash."""

from __future__ import annotations

import base64
import json

import pytest

from accounting.errors import CredentialError
from sandbox.credentials import (
    MAX_TOKEN_CHARS,
    SCOPE_LLM,
    AttemptRef,
    KeyRing,
    TaskCredentials,
    egress_scope,
    encode_token,
    scope_granted,
)

NOW = 1_800_000_000.0
A1 = AttemptRef("team-a", "b1", "t1", 1)
A2 = AttemptRef("team-a", "b1", "t1", 2)
OTHER = AttemptRef("team-a", "b1", "t2", 1)


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def creds(clock: Clock) -> TaskCredentials:
    return TaskCredentials(KeyRing({"k1": b"\x01" * 32}), clock=clock)


def mint(creds: TaskCredentials, ref: AttemptRef = A1, **kw: object) -> str:
    scopes = kw.pop("scopes", [SCOPE_LLM, egress_scope("pypi.test")])
    return creds.mint(ref, scopes, deadline=kw.pop("deadline", NOW + 600), **kw)  # type: ignore[arg-type]


def refused(
    creds: TaskCredentials, token: object, channel: AttemptRef = A1, scope: str = SCOPE_LLM
):
    with pytest.raises(CredentialError) as e:
        creds.verify(token, channel=channel, scope=scope)
    return str(e.value)


def parts(token: str) -> list[str]:
    return token.split(".")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_a_fresh_token_verifies_on_its_own_socket(creds: TaskCredentials) -> None:
    claims = creds.verify(mint(creds), channel=A1, scope=SCOPE_LLM)
    assert claims.ref == A1
    assert claims.exp == NOW + 600
    assert claims.scopes == (SCOPE_LLM, "egress:pypi.test")


def test_expired_token_is_refused(creds: TaskCredentials, clock: Clock) -> None:
    token = mint(creds, deadline=NOW + 10)
    clock.now = NOW + 10
    assert "expired" in refused(creds, token)


def test_not_yet_valid_token_is_refused(creds: TaskCredentials) -> None:
    token = mint(creds, not_before=NOW + 60)
    assert "not valid before" in refused(creds, token)


def test_small_clock_skew_is_tolerated(creds: TaskCredentials) -> None:
    token = mint(creds, not_before=NOW + 3)
    assert creds.verify(token, channel=A1, scope=SCOPE_LLM).nbf == NOW + 3


def test_token_revoked_at_task_end_is_refused_before_its_expiry(creds: TaskCredentials) -> None:
    token = mint(creds)
    creds.revoke(A1)
    assert "not live" in refused(creds, token)


def test_token_replayed_on_another_attempts_socket_is_refused(creds: TaskCredentials) -> None:
    token = mint(creds, A1)
    mint(creds, OTHER)
    assert "not to this socket" in refused(creds, token, channel=OTHER)


def test_old_token_after_a_retry_is_refused(creds: TaskCredentials) -> None:
    old = mint(creds, A1)
    creds.revoke(A1)  # attempt 1 ended (node lost); attempt 2 starts with a new token
    new = mint(creds, A2)
    refused(creds, old, channel=A2)
    refused(creds, old, channel=A1)
    assert creds.verify(new, channel=A2, scope=SCOPE_LLM).ref == A2


def test_superseded_token_of_the_same_attempt_is_refused(creds: TaskCredentials) -> None:
    first = mint(creds)
    second = mint(creds)
    assert "superseded" in refused(creds, first)
    creds.verify(second, channel=A1, scope=SCOPE_LLM)


def test_scope_not_granted_is_refused(creds: TaskCredentials) -> None:
    token = mint(creds, scopes=[egress_scope("pypi.test")])
    assert "scope 'llm:invoke' was not granted" in refused(creds, token)


def test_payload_edited_to_escalate_scope_is_refused(creds: TaskCredentials) -> None:
    token = mint(creds, scopes=[SCOPE_LLM])
    prefix, kid, payload, sig = parts(token)
    data = json.loads(base64.urlsafe_b64decode(payload + "=="))
    data["scp"].append("egress:evil.test")
    edited = ".".join([prefix, kid, b64(json.dumps(data).encode()), sig])
    assert "signature does not match" in refused(creds, edited, scope="egress:evil.test:443")


def test_forged_mac_with_another_key_is_refused(creds: TaskCredentials) -> None:
    token = mint(creds)
    payload = base64.urlsafe_b64decode(parts(token)[2] + "==")
    forged = encode_token("k1", b"\x02" * 32, payload)
    assert "signature does not match" in refused(creds, forged)


def test_unknown_key_id_is_refused(creds: TaskCredentials) -> None:
    forged = encode_token("k9", b"\x01" * 32, b'{"v":1}')
    assert "unknown or retired key" in refused(creds, forged)


def test_empty_signature_is_refused(creds: TaskCredentials) -> None:
    prefix, kid, payload, _ = parts(mint(creds))
    refused(creds, f"{prefix}.{kid}.{payload}.")
    refused(creds, f"{prefix}.{kid}.{payload}")


def test_retired_key_stops_verifying_after_rotation(creds: TaskCredentials) -> None:
    old = mint(creds)
    creds.keys.rotate()
    assert creds.verify(old, channel=A1, scope=SCOPE_LLM)  # still verifies until retired
    creds.keys.retire("k1")
    assert "retired" in refused(creds, old)
    fresh = mint(creds)
    assert parts(fresh)[1] != "k1"
    creds.verify(fresh, channel=A1, scope=SCOPE_LLM)


def test_the_active_key_cannot_be_retired(creds: TaskCredentials) -> None:
    with pytest.raises(CredentialError, match="rotate"):
        creds.keys.retire("k1")


def test_wrong_audience_is_refused(clock: Clock) -> None:
    keys = KeyRing({"k1": b"\x01" * 32})
    other = TaskCredentials(keys, audience="someone-else", clock=clock)
    token = other.mint(A1, [SCOPE_LLM], deadline=NOW + 60)
    mine = TaskCredentials(keys, clock=clock)
    mine.mint(A1, [SCOPE_LLM], deadline=NOW + 60)
    assert "meant for" in refused(mine, token)


def _signed(payload: bytes) -> str:
    return encode_token("k1", b"\x01" * 32, payload)


MALFORMED = {
    "empty": "",
    "a single dot": ".",
    "three parts": "sft1.k1.abc",
    "longer than the cap": "sft1.k1." + "a" * MAX_TOKEN_CHARS + ".b",
    "not base64": "sft1.k1.!!!.???",
    "signed empty object": _signed(b"{}"),
    "signed list payload": _signed(b"[1, 2]"),
    "none": None,
    "an integer": 12345,
    "signed non-json": _signed(b"\xff\xfe not json"),
    "wrong prefix": "jwt1.k1.abc.def",
    "signed wrong field types": _signed(
        json.dumps(
            {
                "v": 1,
                "kid": "k1",
                "aud": "sandfleet-gateway",
                "team": 1,
                "batch": "b",
                "task": "t",
                "attempt": "1",
                "scp": [],
                "iat": 0,
                "nbf": 0,
                "exp": 9,
                "jti": "j",
            }
        ).encode()
    ),
}


@pytest.mark.parametrize("token", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_token_is_refused_without_a_crash(creds: TaskCredentials, token: object) -> None:
    mint(creds)
    refused(creds, token)


def test_refusals_never_echo_the_token(creds: TaskCredentials, clock: Clock) -> None:
    token = mint(creds)
    clock.now = NOW + 3600
    message = refused(creds, token)
    assert parts(token)[2] not in message and parts(token)[3] not in message


def test_egress_scope_matches_hosts_ports_and_wildcards() -> None:
    granted = [egress_scope("pypi.test"), egress_scope("git.test:8443"), egress_scope("*.cdn.test")]
    assert scope_granted(granted, "egress:pypi.test:443")
    assert scope_granted(granted, "egress:PYPI.test.:80")
    assert not scope_granted(granted, "egress:pypi.test:22")
    assert scope_granted(granted, "egress:git.test:8443")
    assert not scope_granted(granted, "egress:git.test:443")
    assert scope_granted(granted, "egress:a.cdn.test:443")
    assert not scope_granted(granted, "egress:cdn.test:443")
    assert not scope_granted(granted, "egress:evilcdn.test:443")
    assert not scope_granted(granted, "egress:pypi.test.evil.test:443")
    assert not scope_granted(granted, "egress:pypi.test")  # a request must name its port
    assert not scope_granted(granted, SCOPE_LLM)


def test_channel_check_without_a_token_needs_a_live_attempt(creds: TaskCredentials) -> None:
    mint(creds, scopes=[egress_scope("pypi.test")])
    assert creds.check_channel(A1, "egress:pypi.test:443").ref == A1
    with pytest.raises(CredentialError, match="not granted"):
        creds.check_channel(A1, "egress:evil.test:443")
    creds.revoke(A1)
    with pytest.raises(CredentialError, match="not live"):
        creds.check_channel(A1, "egress:pypi.test:443")


def test_bad_scopes_and_past_deadlines_cannot_be_minted(creds: TaskCredentials) -> None:
    with pytest.raises(CredentialError, match="unknown scope"):
        creds.mint(A1, ["admin"], deadline=NOW + 60)
    with pytest.raises(CredentialError, match="not a host pattern"):
        creds.mint(A1, ["egress:bad host"], deadline=NOW + 60)
    with pytest.raises(CredentialError, match="deadline"):
        creds.mint(A1, [SCOPE_LLM], deadline=NOW - 1)
