"""SIP message parsing, framing and serialization (RFC 3261 section 7, 18.3, 20).

Theory of operation: a message is parsed in two steps. First the start-line and
the header section are tokenized (size and count limits apply, compact header
names are expanded, folded continuation lines are joined, Via/Route/Record-Route
lines holding several comma-separated values are split into one entry each).
Then the message is checked: mandatory headers present, CSeq well formed,
Content-Length consistent with the bytes that arrived. Every failure raises
:class:`SipParseError` with a human-readable ``reason``. When the failure is found
after a request's start-line and headers were tokenized, the error carries that
partial request in ``request`` so the caller can still answer ``400`` (RFC 3261
18.3: a truncated request SHOULD get a 400); otherwise the bytes are unanswerable.

Datagrams carry one message each; a TCP stream is cut into messages by
:class:`StreamFramer` using the mandatory Content-Length. Serialization always
writes a Content-Length that matches the body.

The parser is strict on purpose: it accepts CRLF line endings only, SIP/2.0 only,
and rejects anything it cannot represent exactly, so that what the edge forwards
is what it understood.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = [
    "MAX_HEADERS",
    "MAX_MESSAGE_BYTES",
    "Headers",
    "SipMessage",
    "SipParseError",
    "SipRequest",
    "SipResponse",
    "StreamFramer",
    "parse_cseq",
    "parse_message",
    "quick_response",
]

MAX_MESSAGE_BYTES = 65_536
MAX_HEADERS = 128

_COMPACT = {
    "a": "Accept-Contact",
    "b": "Referred-By",
    "c": "Content-Type",
    "d": "Request-Disposition",
    "e": "Content-Encoding",
    "f": "From",
    "i": "Call-ID",
    "j": "Reject-Contact",
    "k": "Supported",
    "l": "Content-Length",
    "m": "Contact",
    "n": "Identity-Info",
    "o": "Event",
    "r": "Refer-To",
    "s": "Subject",
    "t": "To",
    "u": "Allow-Events",
    "v": "Via",
    "x": "Session-Expires",
    "y": "Identity",
}
_CANONICAL = {
    name.lower(): name
    for name in (
        *_COMPACT.values(),
        "Allow",
        "CSeq",
        "Max-Forwards",
        "Reason",
        "Record-Route",
        "Retry-After",
        "Route",
        "Server",
        "User-Agent",
        "WWW-Authenticate",
    )
}
# Headers whose comma-separated values are split into one entry each, so the
# top value can be pushed and popped (Via) or inspected (Route) directly.
_SPLIT = frozenset({"via", "route", "record-route"})
_TOKEN = re.compile(r"[A-Za-z0-9.!%*_+`'~-]+")
_STATUS_LINE = re.compile(r"SIP/2\.0 ([1-6][0-9]{2}) ([^\r\n]*)")
_REQUIRED = ("Via", "From", "To", "Call-ID", "CSeq")


class SipParseError(Exception):
    """A message could not be parsed or framed.

    ``reason`` says what is wrong in words fit for a ``400`` reason phrase or a
    log field. ``request`` is the request as far as it could be read, when its
    start-line and headers were readable, so a ``400`` can be addressed; it is
    ``None`` when no response is possible.
    """

    def __init__(self, reason: str, request: SipRequest | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.request = request


def _canonical(name: str) -> str:
    low = name.lower()
    if low in _COMPACT:
        return _COMPACT[low]
    return _CANONICAL.get(low, name)


def _split_commas(value: str) -> list[str]:
    """Split a header value on commas outside quotes and angle brackets."""
    out: list[str] = []
    depth = 0
    quoted = False
    escaped = False
    start = 0
    for i, ch in enumerate(value):
        if escaped:
            escaped = False
        elif quoted:
            if ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch == "<":
            depth += 1
        elif ch == ">":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            out.append(value[start:i].strip())
            start = i + 1
    out.append(value[start:].strip())
    return [v for v in out if v]


@dataclass(slots=True)
class Headers:
    """Ordered header fields; names are compared case-insensitively.

    Compact forms are stored under their full name. Via, Route and Record-Route
    hold one entry per value.
    """

    items: list[tuple[str, str]] = field(default_factory=list)

    def get(self, name: str) -> str | None:
        """The first value of ``name``, or ``None``."""
        low = name.lower()
        for n, v in self.items:
            if n.lower() == low:
                return v
        return None

    def get_all(self, name: str) -> list[str]:
        """Every value of ``name``, top first."""
        low = name.lower()
        return [v for n, v in self.items if n.lower() == low]

    def add(self, name: str, value: str) -> None:
        """Append a header field at the bottom."""
        self.items.append((_canonical(name), value))

    def prepend(self, name: str, value: str) -> None:
        """Insert a header field as the topmost one of its name (e.g. a new Via)."""
        low = name.lower()
        for i, (n, _) in enumerate(self.items):
            if n.lower() == low:
                self.items.insert(i, (_canonical(name), value))
                return
        self.items.insert(0, (_canonical(name), value))

    def pop_first(self, name: str) -> str | None:
        """Remove and return the topmost value of ``name``."""
        low = name.lower()
        for i, (n, v) in enumerate(self.items):
            if n.lower() == low:
                del self.items[i]
                return v
        return None

    def replace_first(self, name: str, value: str) -> None:
        """Set the topmost value of ``name`` (appending it if absent)."""
        low = name.lower()
        for i, (n, _) in enumerate(self.items):
            if n.lower() == low:
                self.items[i] = (n, value)
                return
        self.add(name, value)

    def remove(self, *names: str) -> None:
        """Remove every field called one of ``names``."""
        low = {name.lower() for name in names}
        self.items = [(n, v) for n, v in self.items if n.lower() not in low]

    def copy(self) -> Headers:
        """A shallow copy that can be edited independently."""
        return Headers(list(self.items))

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def _serialize(start: str, headers: Headers, body: bytes) -> bytes:
    lines = [start]
    lines.extend(f"{n}: {v}" for n, v in headers if n.lower() != "content-length")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass(slots=True)
class SipRequest:
    """A SIP request. ``method`` is upper case as received; ``uri`` is the Request-URI."""

    method: str
    uri: str
    headers: Headers
    body: bytes = b""

    def to_bytes(self) -> bytes:
        """Wire form, with a Content-Length matching ``body``."""
        return _serialize(f"{self.method} {self.uri} SIP/2.0", self.headers, self.body)


@dataclass(slots=True)
class SipResponse:
    """A SIP response."""

    status: int
    reason: str
    headers: Headers
    body: bytes = b""

    def to_bytes(self) -> bytes:
        """Wire form, with a Content-Length matching ``body``."""
        return _serialize(f"SIP/2.0 {self.status} {self.reason}", self.headers, self.body)


SipMessage = SipRequest | SipResponse


def parse_cseq(value: str) -> tuple[int, str]:
    """Parse a CSeq value into (sequence number, method); raise SipParseError."""
    parts = value.split()
    if len(parts) != 2 or not parts[0].isdigit() or len(parts[0]) > 10:
        raise SipParseError(f"malformed CSeq {value[:40]!r}")
    number = int(parts[0])
    if number >= 2**31 or not _TOKEN.fullmatch(parts[1]):
        raise SipParseError(f"malformed CSeq {value[:40]!r}")
    return number, parts[1]


def _tokenize(
    head: str, max_headers: int
) -> tuple[SipRequest | None, SipResponse | None, str | None]:
    """Read the start-line and headers. Returns (request, response, deferred error).

    Raises SipParseError when not even the start-line can be read. A problem in
    the header lines after a readable request line is returned as the deferred
    error so the caller can attach the partial request.
    """
    lines = head.split("\r\n")
    start = lines[0]
    request: SipRequest | None = None
    response: SipResponse | None = None
    headers = Headers()
    version_error: str | None = None
    if start.startswith("SIP/"):
        m = _STATUS_LINE.fullmatch(start)
        if m is None:
            raise SipParseError("malformed status line")
        response = SipResponse(int(m.group(1)), m.group(2), headers)
    else:
        parts = start.split(" ")
        if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]):
            raise SipParseError("malformed request line")
        method, uri, version = parts
        if ":" not in uri or not uri.isprintable():
            raise SipParseError("malformed Request-URI")
        request = SipRequest(method, uri, headers)
        if version != "SIP/2.0":
            version_error = f"unsupported SIP version {version[:16]!r}"
    raw: list[str] = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t"):
            if not raw:
                return request, response, "continuation line before any header"
            raw[-1] += " " + line.strip()
        else:
            raw.append(line)
    count = 0
    for line in raw:
        name, sep, value = line.partition(":")
        name = name.rstrip(" \t")
        if not sep or not _TOKEN.fullmatch(name):
            return request, response, "malformed header line"
        value = value.strip(" \t")
        if not value.isprintable():
            return request, response, f"control character in header {name[:32]}"
        values = _split_commas(value) if name.lower() in _SPLIT or name in ("v", "V") else [value]
        for v in values:
            count += 1
            if count > max_headers:
                return request, response, f"more than {max_headers} header fields"
            headers.add(name, v)
    return request, response, version_error


def _validate(msg: SipMessage) -> str | None:
    h = msg.headers
    for name in _REQUIRED:
        if h.get(name) is None:
            return f"missing mandatory header {name}"
    if not h.get("Call-ID"):
        return "empty Call-ID"
    try:
        _, cseq_method = parse_cseq(h.get("CSeq") or "")
    except SipParseError as exc:
        return exc.reason
    if isinstance(msg, SipRequest) and cseq_method != msg.method:
        return "CSeq method does not match the request method"
    mf = h.get("Max-Forwards")
    if mf is not None and (not mf.isdigit() or int(mf) > 255):
        return "malformed Max-Forwards"
    lengths = set(h.get_all("Content-Length"))
    if len(lengths) > 1:
        return "conflicting Content-Length headers"
    return None


def parse_message(
    data: bytes,
    *,
    stream: bool = False,
    max_bytes: int = MAX_MESSAGE_BYTES,
    max_headers: int = MAX_HEADERS,
) -> SipMessage:
    """Parse one complete SIP message; raise SipParseError on anything malformed.

    With ``stream=False`` (a datagram) a missing Content-Length means the body is
    the rest of the datagram and bytes beyond a Content-Length are discarded
    (RFC 3261 18.3). With ``stream=True`` (a frame cut by StreamFramer)
    Content-Length is mandatory and must match exactly.
    """
    if len(data) > max_bytes:
        raise SipParseError(f"message larger than {max_bytes} bytes")
    data = data.lstrip(b"\r\n")
    if not data:
        raise SipParseError("empty message")
    end = data.find(b"\r\n\r\n")
    deferred: str | None = None
    if end < 0:
        # Truncated inside the headers: read the complete lines for a 400.
        cut = data.rfind(b"\r\n")
        head_bytes = data[:cut] if cut > 0 else data
        body = b""
        deferred = "header section not terminated by an empty line"
    else:
        head_bytes = data[:end]
        body = data[end + 4 :]
    try:
        head = head_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise SipParseError("header section is not valid UTF-8") from None
    request, response, error = _tokenize(head, max_headers)
    msg: SipMessage
    if request is not None:
        msg = request
    else:
        assert response is not None  # _tokenize returns one of the two
        msg = response
    error = error or deferred or _validate(msg)
    if error is None:
        cl = msg.headers.get("Content-Length")
        if cl is None:
            if stream:
                error = "missing Content-Length on a stream transport"
        elif not cl.isdigit() or len(cl) > 9:
            error = "malformed Content-Length"
        elif len(body) < int(cl):
            error = "message truncated: body shorter than Content-Length"
        elif stream and len(body) != int(cl):
            error = "body longer than Content-Length"
        else:
            body = body[: int(cl)]
    if error is not None:
        raise SipParseError(error, request)
    msg.body = body
    return msg


_QUICK = {"via": "Via", "v": "Via", "from": "From", "f": "From", "to": "To", "t": "To",
          "call-id": "Call-ID", "i": "Call-ID", "cseq": "CSeq"}  # fmt: skip


def quick_response(
    data: bytes,
    status: int,
    reason: str,
    *,
    to_tag: str,
    extra: tuple[tuple[str, str], ...] = (),
    max_bytes: int = MAX_MESSAGE_BYTES,
) -> bytes | None:
    """A response to the request in ``data`` built from its raw header lines,
    without a full parse: for refusing requests from sources no trunk admits at
    a fraction of the cost. Via, From, To (with ``to_tag`` added unless it has
    a tag), Call-ID and CSeq are copied as received, then ``extra``.

    None when ``data`` is no request, an ACK (never answered), or lacks one of
    those headers: such input is dropped, not answered.
    """
    if len(data) > max_bytes:
        return None
    end = data.find(b"\r\n\r\n")
    head = data[: end if end >= 0 else len(data)]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    lines = text.lstrip("\r\n").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] != "SIP/2.0" or not _TOKEN.fullmatch(parts[0]):
        return None
    if parts[0] == "ACK":
        return None
    found: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        key = _QUICK.get(name.strip().lower())
        if key is None or not sep:
            continue
        value = value.strip()
        if not value or not value.isprintable():
            return None
        found.setdefault(key, []).append(value)
    if len(found) != 5 or any(len(v) > 1 for k, v in found.items() if k != "Via"):
        return None
    to = found["To"][0]
    close = to.rfind(">")
    if "tag=" not in to[close + 1 :].lower():
        to = f"{to};tag={to_tag}"
    out = [f"SIP/2.0 {status} {reason}"]
    out += [f"Via: {via}" for via in found["Via"]]
    out += [f"From: {found['From'][0]}", f"To: {to}", f"Call-ID: {found['Call-ID'][0]}"]
    out.append(f"CSeq: {found['CSeq'][0]}")
    out += [f"{n}: {v}" for n, v in extra]
    out.append("Content-Length: 0")
    return ("\r\n".join(out) + "\r\n\r\n").encode()


class StreamFramer:
    """Cuts a byte stream (TCP) into whole SIP messages using Content-Length.

    Feed bytes with :meth:`feed`, then call :meth:`next_frame` until it returns
    ``None``. A stream that cannot be framed (header section over the size limit,
    missing or malformed Content-Length) raises SipParseError: the connection can
    not be resynchronized and must be closed. CRLF keep-alives between messages
    (RFC 5626) are skipped.
    """

    def __init__(self, max_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self._buf = bytearray()
        self._max = max_bytes

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        self._buf += data

    def pending(self) -> int:
        """Bytes buffered towards the next message (0 after whole messages and
        keep-alives only)."""
        while self._buf[:2] == b"\r\n":
            del self._buf[:2]
        return len(self._buf)

    def next_frame(self) -> bytes | None:
        """The next complete message's bytes, or None if more bytes are needed."""
        while self._buf[:2] == b"\r\n":
            del self._buf[:2]
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > self._max:
                raise SipParseError(f"header section larger than {self._max} bytes")
            return None
        length: int | None = None
        for line in bytes(self._buf[:end]).split(b"\r\n")[1:]:
            name, sep, value = line.partition(b":")
            if sep and name.strip().lower() in (b"content-length", b"l"):
                text = value.strip()
                if not text.isdigit() or len(text) > 9:
                    raise SipParseError("malformed Content-Length")
                if length is not None and length != int(text):
                    raise SipParseError("conflicting Content-Length headers")
                length = int(text)
        if length is None:
            raise SipParseError("missing Content-Length on a stream transport")
        total = end + 4 + length
        if total > self._max:
            raise SipParseError(f"message larger than {self._max} bytes")
        if len(self._buf) < total:
            return None
        frame = bytes(self._buf[:total])
        del self._buf[:total]
        return frame
