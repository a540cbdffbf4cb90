"""Parser, framer and serializer tests for trunkline.sip.message and fields."""

from __future__ import annotations

import pytest
from sip.sipkit import invite

from trunkline.sip.fields import Via, header_tag, quote, uri_user, with_tag
from trunkline.sip.message import (
    MAX_MESSAGE_BYTES,
    SipParseError,
    SipRequest,
    SipResponse,
    StreamFramer,
    parse_message,
)

COMPACT = (
    b"INVITE sip:+15550100@10.0.0.5 SIP/2.0\r\n"
    b"v: SIP/2.0/UDP 10.0.0.1:5070;branch=z9hG4bKa, SIP/2.0/UDP 10.0.0.2;branch=z9hG4bKb\r\n"
    b"f: <sip:alice@10.0.0.1>;tag=1\r\n"
    b"t: <sip:+15550100@10.0.0.5>\r\n"
    b"i: abc\r\n"
    b"CSeq: 7 INVITE\r\n"
    b"m: <sip:alice@10.0.0.1>\r\n"
    b"Subject: a folded\r\n"
    b"  subject line\r\n"
    b"l: 3\r\n\r\nabcEXTRA"
)


def test_compact_forms_are_expanded_and_via_values_split() -> None:
    """Compact names map to full names; one Via line with two values gives two entries."""
    msg = parse_message(COMPACT)
    assert isinstance(msg, SipRequest)
    assert msg.method == "INVITE"
    assert msg.headers.get("Call-ID") == "abc"
    assert msg.headers.get("from") == "<sip:alice@10.0.0.1>;tag=1"
    assert msg.headers.get("Contact") == "<sip:alice@10.0.0.1>"
    assert len(msg.headers.get_all("Via")) == 2


def test_folded_header_lines_are_joined() -> None:
    """A continuation line (leading whitespace) belongs to the previous header."""
    msg = parse_message(COMPACT)
    assert msg.headers.get("Subject") == "a folded subject line"


def test_datagram_bytes_beyond_content_length_are_discarded() -> None:
    """RFC 3261 18.3: bytes after Content-Length in a datagram are ignored."""
    assert parse_message(COMPACT).body == b"abc"


def test_datagram_without_content_length_takes_the_rest() -> None:
    """Over UDP a missing Content-Length means the body runs to the datagram's end."""
    data = invite().replace(b"Content-Length: 5\r\n", b"")
    assert parse_message(data).body == b"v=0\r\n"


def test_truncated_body_raises_with_the_partial_request() -> None:
    """A body shorter than Content-Length is an error that still allows a 400."""
    with pytest.raises(SipParseError) as err:
        parse_message(invite()[:-3])
    assert "truncated" in err.value.reason
    assert err.value.request is not None
    assert err.value.request.headers.get("Call-ID") == "call-1@10.0.0.1"


def test_truncated_headers_keep_complete_lines() -> None:
    """A datagram cut inside the headers yields a partial request of whole lines."""
    data = invite()
    cut = data[: data.index(b"Call-ID") + 4]
    with pytest.raises(SipParseError) as err:
        parse_message(cut)
    assert err.value.request is not None
    assert err.value.request.headers.get("Via") is not None


@pytest.mark.parametrize("name", ["Via", "From", "To", "Call-ID", "CSeq"])
def test_missing_mandatory_header_is_an_error(name: str) -> None:
    """Each of Via/From/To/Call-ID/CSeq is mandatory."""
    lines = [ln for ln in invite().split(b"\r\n") if not ln.startswith(name.encode() + b":")]
    with pytest.raises(SipParseError) as err:
        parse_message(b"\r\n".join(lines))
    assert name in err.value.reason


def test_oversized_message_is_rejected_without_partial() -> None:
    """A message over the size limit is not parsed at all."""
    data = invite(body=b"x" * MAX_MESSAGE_BYTES)
    with pytest.raises(SipParseError) as err:
        parse_message(data)
    assert err.value.request is None


def test_too_many_headers_is_an_error() -> None:
    """More header fields than the limit are refused."""
    extra = "".join(f"X-H{i}: {i}\r\n" for i in range(200))
    with pytest.raises(SipParseError, match="header fields"):
        parse_message(invite(extra=extra))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x00\x01garbage", "request line"),
        (b"HELLO\r\n\r\n", "request line"),
        (b"SIP/2.0 99 Weird\r\n\r\n", "status line"),
        (b"\xff\xfe\r\n\r\n", "UTF-8"),
        (b"", "empty"),
    ],
)
def test_garbage_raises_parse_error(data: bytes, reason: str) -> None:
    """Unreadable start-lines raise SipParseError with no partial request."""
    with pytest.raises(SipParseError, match=reason) as err:
        parse_message(data)
    assert err.value.request is None


def test_cseq_method_must_match() -> None:
    """A CSeq naming another method than the request line is rejected."""
    with pytest.raises(SipParseError, match="CSeq method"):
        parse_message(invite().replace(b"1 INVITE", b"1 BYE"))


def test_wrong_version_keeps_partial_for_a_400() -> None:
    """SIP/3.0 is refused but the headers are still read."""
    with pytest.raises(SipParseError, match="version") as err:
        parse_message(invite().replace(b"SIP/2.0\r\n", b"SIP/3.0\r\n", 1))
    assert err.value.request is not None
    assert err.value.request.headers.get("CSeq") == "1 INVITE"


def test_round_trip_rewrites_content_length() -> None:
    """Serializing writes one Content-Length equal to the body length."""
    msg = parse_message(invite())
    msg.body = b"hello"
    again = parse_message(msg.to_bytes())
    assert again.body == b"hello"
    assert again.headers.get_all("Content-Length") == ["5"]


def test_response_parses() -> None:
    """Status lines parse to SipResponse with status and reason."""
    data = invite().replace(b"INVITE sip:+15550100@10.0.0.5 SIP/2.0", b"SIP/2.0 180 Ringing")
    msg = parse_message(data)
    assert isinstance(msg, SipResponse)
    assert (msg.status, msg.reason) == (180, "Ringing")


def test_stream_framer_cuts_messages_across_chunks() -> None:
    """TCP bytes split anywhere come out as whole messages; CRLF keep-alives vanish."""
    framer = StreamFramer()
    data = b"\r\n\r\n" + invite() + invite(branch="z9hG4bKb")
    frames: list[bytes] = []
    for i in range(0, len(data), 7):
        framer.feed(data[i : i + 7])
        while (frame := framer.next_frame()) is not None:
            frames.append(frame)
    assert frames == [invite(), invite(branch="z9hG4bKb")]


def test_stream_framer_requires_content_length() -> None:
    """On a stream a message without Content-Length cannot be framed."""
    framer = StreamFramer()
    framer.feed(invite().replace(b"Content-Length: 5\r\n", b""))
    with pytest.raises(SipParseError, match="Content-Length"):
        framer.next_frame()


def test_stream_framer_bounds_the_header_section() -> None:
    """An endless header section is cut off at the size limit."""
    framer = StreamFramer(max_bytes=1000)
    framer.feed(b"INVITE sip:a@b SIP/2.0\r\n" + b"X: y\r\n" * 300)
    with pytest.raises(SipParseError, match="larger"):
        framer.next_frame()


def test_via_parse_and_response_address() -> None:
    """Via gives transport, sent-by with default port, branch and rport/received."""
    via = Via.parse("SIP/2.0/udp PBX.example;branch=z9hG4bKx;rport=5099;received=1.2.3.4")
    assert (via.transport, via.sent_by, via.branch) == ("UDP", "pbx.example:5060", "z9hG4bKx")
    assert via.response_address("9.9.9.9") == ("1.2.3.4", 5099)
    assert str(Via.parse(str(via))) == str(via)


def test_uri_user_and_tags() -> None:
    """Users come out of sip:, tel: and name-addr forms; tags are read and added once."""
    assert uri_user("sip:+15550100;npdi@gw;user=phone") == "+15550100"
    assert uri_user('"Bob" <sip:bob:pw@host>;tag=1') == "bob"
    assert uri_user("tel:+15550100;phone-context=x") == "+15550100"
    assert uri_user("sip:host.example") is None
    assert header_tag('"a;tag=no" <sip:a@b>;tag=yes') == "yes"
    assert with_tag(with_tag("<sip:a@b>", "t1"), "t2") == "<sip:a@b>;tag=t1"
    assert quote('say "hi"\n') == '"say \\"hi\\""'


def test_quick_response_copies_the_matching_headers_without_a_full_parse() -> None:
    """quick_response answers from the raw lines: every Via (compact forms too), From,
    To with our tag, Call-ID, CSeq, then the extra headers; parseable as a response."""
    from trunkline.sip.message import quick_response

    data = (
        b"INVITE sip:+15550100@10.0.0.5 SIP/2.0\r\n"
        b"v: SIP/2.0/UDP 10.0.0.1:5070;branch=z9hG4bKa, SIP/2.0/UDP 10.0.0.2;branch=z9hG4bKb\r\n"
        b"f: <sip:a@b>;tag=1\r\nt: <sip:c@d>\r\ni: q@w\r\nCSeq: 7 INVITE\r\n"
        b"Content-Length: 0\r\n\r\n"
    )
    out = quick_response(data, 403, "Forbidden", to_tag="xyz", extra=(("Reason", "r"),))
    assert out is not None
    resp = parse_message(out)
    assert isinstance(resp, SipResponse)
    assert resp.status == 403
    assert len(resp.headers.get_all("Via")) == 2
    assert resp.headers.get("To") == "<sip:c@d>;tag=xyz"
    assert (resp.headers.get("Call-ID"), resp.headers.get("CSeq")) == ("q@w", "7 INVITE")
    assert resp.headers.get("Reason") == "r"
    ack = data.replace(b"INVITE sip", b"ACK sip").replace(b"7 INVITE", b"7 ACK")
    no_callid = data.replace(b"i: q@w\r\n", b"")
    for bad in (ack, no_callid, b"SIP/2.0 200 OK\r\n\r\n", b"\xff\xfe garbage", b""):
        assert quick_response(bad, 403, "Forbidden", to_tag="x") is None
