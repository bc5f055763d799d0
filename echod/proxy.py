"""The PROXY protocol, versions 1 and 2 (HAProxy's ``doc/proxy-protocol.txt``), as received.

A load balancer in front of echod prepends one header to each connection, saying who the
real client is. This module only decodes: :func:`parse` is a pure function over the bytes
received so far, so a caller feeds it what it has read (all of it, each time) and gets one of

- ``None``: not enough bytes yet, read more (what is there is a valid start of a header);
- a :class:`ProxyHeader`, whose ``length`` says how many bytes it used: the rest belongs to
  the client and is echoed;
- :class:`ProxyError`, with a one-line reason: close the connection.

Errors are reported as early as the bytes allow (a wrong first byte fails at once), so that a
sender learns of its mistake without waiting for a timeout, and nothing is guessed: with the
protocol on, a connection without a valid header is never served (the spec's section 5).

Which address stands for the client (``ProxyHeader.source``):

- v1 ``TCP4`` / ``TCP6`` and v2 ``PROXY`` over TCP on IPv4 / IPv6: the client's address and
  port from the header.
- v2 ``LOCAL`` and v1 ``UNKNOWN``: the balancer opened the connection for itself (its health
  checks); ``source`` is None and ``local`` is true: the connection is the balancer's own.
- v2 ``PROXY`` with another family or transport (``UNSPEC``, ``AF_UNIX``, UDP): the spec lets
  a receiver that does not implement them fall back to the real connection's endpoints, which
  echod does: ``source`` is None, ``local`` false (a relayed connection, from an unknown
  client, logged as coming from the balancer).

v2 TLVs are walked, bounds-checked, and skipped; a ``PP2_TYPE_CRC32C`` checksum, when
present, is verified (the spec requires it of receivers that support it).
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass

#: The v2 signature: 12 bytes no other protocol starts with.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
#: The longest v1 line, CRLF included (the spec's worst case, "PROXY UNKNOWN" with IPv6).
V1_MAX = 107
V2_FIXED = 16
#: The longest v2 header the 16-bit length allows.
V2_MAX = V2_FIXED + 0xFFFF

VERSIONS = ("v1", "v2", "any")

_V2_LOCAL = 0x0
_V2_PROXY = 0x1
_TLV_CRC32C = 0x03

# Address block sizes of the combinations the spec lays out (fam byte: family << 4 | transport):
# TCP and UDP over IPv4, over IPv6, UNIX stream and datagram.
_ADDRESS_SIZE = {0x11: 12, 0x12: 12, 0x21: 36, 0x22: 36, 0x31: 216, 0x32: 216}
_FAMILY_NAMES = {0x0: "UNSPEC", 0x1: "IPv4", 0x2: "IPv6", 0x3: "UNIX"}
_TRANSPORT_NAMES = {0x0: "UNSPEC", 0x1: "STREAM", 0x2: "DGRAM"}

# A v1 line: exactly one space between fields, no leading zeroes in numbers (the spec forbids
# them, to avoid octal confusion), IPv6 as hex groups and colons only (no zone, no embedded
# dotted quad). The IPv6 text is checked further by inet_pton.
_OCTET = rb"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = rb"(?:" + _OCTET + rb"\.){3}" + _OCTET
_IPV6 = rb"[0-9A-Fa-f:]{2,39}"
_PORT = rb"(0|[1-9][0-9]{0,4})"
_V1_TCP4 = re.compile(
    rb"PROXY TCP4 (" + _IPV4 + rb") (" + _IPV4 + rb") " + _PORT + rb" " + _PORT + rb"\r\n"
)
_V1_TCP6 = re.compile(
    rb"PROXY TCP6 (" + _IPV6 + rb") (" + _IPV6 + rb") " + _PORT + rb" " + _PORT + rb"\r\n"
)
# What may appear in a v1 line before its CRLF: printable US-ASCII and spaces (and, while
# the line is incomplete, a CR last: the start of the CRLF).
_V1_PRINTABLE = re.compile(rb"[\x20-\x7e]*")
_V1_PARTIAL = re.compile(rb"[\x20-\x7e]*\r?")


class ProxyError(ValueError):
    """The bytes are not a valid PROXY header; ``str()`` of it says why, in one line."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A decoded header. ``source``/``destination`` are (address, port) as the header gave
    them (IPv6 in its compressed form), or None when the connection's own endpoints stand
    (see the module docstring); ``local``: the balancer's own connection (a health check)."""

    version: int
    length: int
    local: bool
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None


def parse(data: bytes | bytearray, accept: str = "any") -> ProxyHeader | None:
    """Decode the header at the start of ``data`` (everything received so far).

    ``accept`` is ``v1``, ``v2`` or ``any`` (either, told apart by the first bytes). Returns
    None when more bytes are needed, else the header; raises :class:`ProxyError`. An
    incomplete header costs O(1) whatever its announced length, so feeding a long one byte
    at a time stays linear.
    """
    if not data:
        return None
    first = data[0]
    if first == 0x50 and accept != "v2":  # "P"
        return _parse_v1(bytes(data[:V1_MAX]))
    if first == 0x0D and accept != "v1":  # "\r"
        return _parse_v2(data)
    expected = {"v1": "a PROXY v1 header", "v2": "a PROXY v2 header"}.get(accept, "a PROXY header")
    raise ProxyError(f"not {expected} (starts with {_show(data)})")


def _show(data: bytes | bytearray) -> str:
    """A few bytes for an error message, printable and bounded."""
    return repr(bytes(data[:16]))


# -- version 1 ---------------------------------------------------------------------------------


def _parse_v1(head: bytes) -> ProxyHeader | None:
    end = head.find(b"\r\n")
    if end < 0:
        _check_v1_prefix(head)
        return None
    line = head[: end + 2]
    if not line.startswith(V1_PREFIX):
        raise ProxyError(f"not a PROXY header (starts with {_show(line)})")
    if _V1_PRINTABLE.fullmatch(line, 0, end) is None:
        raise ProxyError(f"bad byte in PROXY v1 line {_show(line)}")
    if line.startswith(b"PROXY UNKNOWN"):
        # The spec: for UNKNOWN the receiver ignores anything before the CRLF.
        if end == 13 or line[13] == 0x20:
            return ProxyHeader(version=1, length=len(line), local=True)
        raise ProxyError(f"bad PROXY v1 line {_show(line)}")
    if line.startswith(b"PROXY TCP4 "):
        match, family = _V1_TCP4.fullmatch(line), socket.AF_INET
    else:
        match, family = _V1_TCP6.fullmatch(line), socket.AF_INET6
    if match is None:
        raise ProxyError(f"bad PROXY v1 line {_show(line)}")
    src, dst, sport, dport = match.groups()
    return ProxyHeader(
        version=1,
        length=len(line),
        local=False,
        source=(_v1_address(family, src), _v1_port(sport)),
        destination=(_v1_address(family, dst), _v1_port(dport)),
    )


def _check_v1_prefix(head: bytes) -> None:
    """No CRLF yet: fail now if the line cannot become a valid one."""
    if not V1_PREFIX.startswith(head[: len(V1_PREFIX)]):
        raise ProxyError(f"not a PROXY header (starts with {_show(head)})")
    if len(head) >= V1_MAX:
        raise ProxyError(f"PROXY v1 line too long (no CRLF in {V1_MAX} bytes)")
    if _V1_PARTIAL.fullmatch(head) is None:
        raise ProxyError(f"bad byte in PROXY v1 line {_show(head)}")


def _v1_address(family: int, text: bytes) -> str:
    if family == socket.AF_INET:
        return text.decode("ascii")  # the pattern admits only the canonical dotted quad
    try:
        return socket.inet_ntop(family, socket.inet_pton(family, text.decode("ascii")))
    except OSError:
        raise ProxyError(f"bad address {text.decode('ascii')!r} in PROXY v1 line") from None


def _v1_port(text: bytes) -> int:
    port = int(text)
    if port > 0xFFFF:
        raise ProxyError(f"port {port} out of range in PROXY v1 line")
    return port


# -- version 2 ---------------------------------------------------------------------------------


def _parse_v2(data: bytes | bytearray) -> ProxyHeader | None:
    have = len(data)
    if have < V2_FIXED or not data.startswith(V2_SIGNATURE):
        _check_v2_start(data)
        return None
    ver_cmd, fam = data[12], data[13]
    _check_v2_fixed(ver_cmd, fam)
    total = V2_FIXED + (data[14] << 8 | data[15])
    if have < total:
        return None
    if ver_cmd & 0x0F == _V2_LOCAL:
        # The spec: use the real endpoints, and discard the block, family included.
        return ProxyHeader(version=2, length=total, local=True)
    needed = _ADDRESS_SIZE.get(fam)
    if needed is None:
        # UNSPEC, or a family and transport the spec lists no layout for: the real
        # endpoints stand, and the block (whose layout is unknown) is skipped whole.
        return ProxyHeader(version=2, length=total, local=False)
    if total - V2_FIXED < needed:
        raise ProxyError(
            f"PROXY v2 address block of {total - V2_FIXED} bytes is shorter than"
            f" {_FAMILY_NAMES[fam >> 4]} needs ({needed})"
        )
    if total > V2_FIXED + needed:
        _check_tlvs(bytes(data[:total]), V2_FIXED + needed)
    if fam == 0x11:
        size, af = 4, socket.AF_INET
    elif fam == 0x21:
        size, af = 16, socket.AF_INET6
    else:
        return ProxyHeader(version=2, length=total, local=False)  # UDP, UNIX: see the top
    at = V2_FIXED
    ports = at + 2 * size
    return ProxyHeader(
        version=2,
        length=total,
        local=False,
        source=(socket.inet_ntop(af, data[at : at + size]), data[ports] << 8 | data[ports + 1]),
        destination=(
            socket.inet_ntop(af, data[at + size : ports]),
            data[ports + 2] << 8 | data[ports + 3],
        ),
    )


def _check_v2_start(data: bytes | bytearray) -> None:
    """Fewer than 16 bytes, or a wrong signature: fail now if they cannot start a header."""
    fixed = bytes(data[:V2_FIXED])
    if not V2_SIGNATURE.startswith(fixed[:12]):
        raise ProxyError(f"bad PROXY v2 signature {_show(fixed)}")
    if len(fixed) > 12:
        _check_v2_fixed(fixed[12], fixed[13] if len(fixed) > 13 else None)


def _check_v2_fixed(ver_cmd: int, fam: int | None) -> None:
    if ver_cmd >> 4 != 2:
        raise ProxyError(f"PROXY v2 header with version {ver_cmd >> 4}, not 2")
    if ver_cmd & 0x0F not in (_V2_LOCAL, _V2_PROXY):
        raise ProxyError(f"PROXY v2 header with unknown command {ver_cmd & 0x0F:#x}")
    if fam is not None and (fam >> 4 not in _FAMILY_NAMES or fam & 0x0F not in _TRANSPORT_NAMES):
        raise ProxyError(f"PROXY v2 header with unknown family/transport {fam:#04x}")


def _check_tlvs(header: bytes, offset: int) -> None:
    """Walk the TLVs from ``offset`` to the end: each must fit in the header exactly."""
    end = len(header)
    crc_at = -1
    while offset < end:
        if offset + 3 > end:
            raise ProxyError(f"PROXY v2 TLV header cut at byte {offset} of {end}")
        kind = header[offset]
        length = int.from_bytes(header[offset + 1 : offset + 3], "big")
        value = offset + 3
        if value + length > end:
            raise ProxyError(
                f"PROXY v2 TLV {kind:#04x} of {length} bytes runs past the header ({end} bytes)"
            )
        if kind == _TLV_CRC32C:
            if length != 4:
                raise ProxyError(f"PROXY v2 CRC32C TLV of {length} bytes, not 4")
            crc_at = value
        offset = value + length
    if crc_at >= 0:
        expected = int.from_bytes(header[crc_at : crc_at + 4], "big")
        if crc32c(header[:crc_at] + b"\0\0\0\0" + header[crc_at + 4 :]) != expected:
            raise ProxyError("PROXY v2 header fails its CRC32C checksum")


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, RFC 4960 appendix B), as the PP2_TYPE_CRC32C TLV carries it."""
    crc = 0xFFFFFFFF
    table = _CRC32C
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# -- building headers (the sender's side: tests, the benchmark) ---------------------------------


def v1_header(source: tuple[str, int] | None, destination: tuple[str, int] | None) -> bytes:
    """A v1 line for TCP between the two endpoints; ``UNKNOWN`` when either is None."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    family = "TCP6" if ":" in source[0] else "TCP4"
    return (f"PROXY {family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n").encode(
        "ascii"
    )


def v2_header(
    source: tuple[str, int] | None,
    destination: tuple[str, int] | None,
    tlvs: tuple[tuple[int, bytes], ...] = (),
    *,
    checksum: bool = False,
) -> bytes:
    """A v2 header: ``PROXY`` over TCP between the endpoints, or ``LOCAL`` when either is
    None; with ``tlvs`` (type, value) appended and, with ``checksum``, a CRC32C TLV."""
    if source is None or destination is None:
        ver_cmd, fam, block = 0x20 | _V2_LOCAL, 0x00, b""
    else:
        af = socket.AF_INET6 if ":" in source[0] else socket.AF_INET
        ver_cmd = 0x20 | _V2_PROXY
        fam = 0x21 if af == socket.AF_INET6 else 0x11
        block = (
            socket.inet_pton(af, source[0])
            + socket.inet_pton(af, destination[0])
            + source[1].to_bytes(2, "big")
            + destination[1].to_bytes(2, "big")
        )
    for kind, value in tlvs:
        block += bytes([kind]) + len(value).to_bytes(2, "big") + value
    if checksum:
        block += bytes([_TLV_CRC32C]) + (4).to_bytes(2, "big") + b"\0\0\0\0"
    header = V2_SIGNATURE + bytes([ver_cmd, fam]) + len(block).to_bytes(2, "big") + block
    if checksum:
        header = header[:-4] + crc32c(header).to_bytes(4, "big")
    return header
