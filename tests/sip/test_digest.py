"""Digest authentication (RFC 3261 section 22, RFC 7616, RFC 8760): nonces, replay, expiry."""

from __future__ import annotations

import pytest
from sip.sipkit import digest_header, seeded

from trunkline.sip.digest import AuthResult, DigestAuthenticator, parse_credentials
from trunkline.sip.message import SipParseError

USER, PASSWORD = "carrier", "pw-of-the-carrier"
BOTH = ("SHA-256", "MD5")


def auth(ttl_s: float = 60.0) -> DigestAuthenticator:
    return DigestAuthenticator("trunkline", ttl_s, seeded())


def check(
    a: DigestAuthenticator, header: str, now: float, algorithms: tuple[str, ...] = BOTH
) -> AuthResult:
    return a.verify([header], "INVITE", USER, PASSWORD, algorithms, now)


def test_challenges_offer_each_algorithm_in_order_with_qop_auth() -> None:
    """One challenge per allowed algorithm, most preferred first, qop="auth", our realm."""
    values = auth().challenges(0.0, BOTH)
    assert [v.split("algorithm=")[1].split(",")[0] for v in values] == ["SHA-256", "MD5"]
    assert all('realm="trunkline"' in v and 'qop="auth"' in v for v in values)
    assert "stale=true" in auth().challenges(0.0, BOTH, stale=True)[0]


@pytest.mark.parametrize("index", [0, 1], ids=["SHA-256", "MD5"])
def test_right_password_is_accepted_with_either_algorithm(index: int) -> None:
    """A response computed with the right password verifies, with SHA-256 or MD5."""
    a = auth()
    challenge = a.challenges(0.0, BOTH)[index]
    assert check(a, digest_header(challenge), 0.5) is AuthResult.OK


def test_wrong_password_username_or_algorithm_is_bad() -> None:
    """Wrong password, wrong username, or an algorithm the trunk does not allow: BAD."""
    a = auth()
    sha, md5 = a.challenges(0.0, BOTH)
    assert check(a, digest_header(sha, password="guess"), 0.1) is AuthResult.BAD
    assert check(a, digest_header(sha, username="someone"), 0.1) is AuthResult.BAD
    assert check(a, digest_header(md5), 0.1, algorithms=("SHA-256",)) is AuthResult.BAD


def test_a_nonce_count_can_not_be_replayed() -> None:
    """qop=auth: the same nonce-count twice is STALE; a higher one is accepted."""
    a = auth()
    challenge = a.challenges(0.0, BOTH)[0]
    first = digest_header(challenge, nc=1)
    assert check(a, first, 0.1) is AuthResult.OK
    assert check(a, first, 0.2) is AuthResult.STALE  # a captured INVITE, replayed
    assert check(a, digest_header(challenge, nc=2), 0.3) is AuthResult.OK
    assert check(a, digest_header(challenge, nc=2), 0.4) is AuthResult.STALE


def test_a_nonce_without_qop_works_once() -> None:
    """Without qop (RFC 2069 style) a nonce is single-use."""
    a = auth()
    header = digest_header(a.challenges(0.0, BOTH)[1], qop=False)
    assert check(a, header, 0.1) is AuthResult.OK
    assert check(a, header, 0.2) is AuthResult.STALE


def test_an_expired_nonce_is_stale_and_a_forged_one_unknown() -> None:
    """A nonce older than ttl_s is STALE (right password); one we never issued is UNKNOWN."""
    a = auth(ttl_s=30.0)
    challenge = a.challenges(0.0, BOTH)[0]
    assert check(a, digest_header(challenge), 30.5) is AuthResult.STALE
    other = DigestAuthenticator("trunkline", 30.0, seeded(99)).challenges(0.0, BOTH)[0]
    assert check(a, digest_header(other), 0.1) is AuthResult.UNKNOWN_NONCE
    forged = challenge.replace('nonce="0.', 'nonce="1.')
    assert check(a, digest_header(forged), 0.1) is AuthResult.UNKNOWN_NONCE


def test_missing_or_foreign_realm_credentials_mean_challenge() -> None:
    """No credentials, or credentials for another realm: MISSING (challenge)."""
    a = auth()
    assert a.verify([], "INVITE", USER, PASSWORD, BOTH, 0.0) is AuthResult.MISSING
    other = digest_header(a.challenges(0.0, BOTH)[0]).replace("trunkline", "elsewhere")
    assert check(a, other, 0.1) is AuthResult.MISSING


def test_issuing_nonces_stores_nothing() -> None:
    """A challenge flood grows no state: only a valid answer is remembered."""
    a = auth()
    for i in range(10_000):
        a.challenges(i / 1000, BOTH)
    assert len(a) == 0
    assert check(a, digest_header(a.challenges(11.0, BOTH)[0]), 11.1) is AuthResult.OK
    assert len(a) == 1


def test_parse_credentials_reads_quoted_and_bare_values() -> None:
    """Quoted values may hold commas and escapes; a non-Digest scheme is refused."""
    c = parse_credentials(
        'Digest username="a\\"b", realm="r", nonce="n,1", uri="sip:x@y", '
        'response=ABC, algorithm=sha-256, qop=auth, nc=00000001, cnonce="c"'
    )
    assert (c.username, c.nonce, c.response, c.algorithm, c.nc) == (
        'a"b',
        "n,1",
        "abc",
        "SHA-256",
        "00000001",
    )
    with pytest.raises(SipParseError):
        parse_credentials("Basic dXNlcjpwYXNz")
    with pytest.raises(SipParseError):
        parse_credentials('Digest username="a", username="b", realm="r"')
