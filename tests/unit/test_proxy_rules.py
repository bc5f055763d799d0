"""The PROXY parser's error messages, pinned word for word, and the edges of its bounds.

These are the checks the mutation run (``make mutation``) found missing.
"""

from __future__ import annotations

import pytest

from echod import proxy
from echod.proxy import ProxyError, parse

pytestmark = pytest.mark.timeout(30)

SIG = proxy.V2_SIGNATURE


def v2(ver_cmd: int, fam: int, block: bytes) -> bytes:
    """A v2 header from its parts, announcing the block's own length."""
    return SIG + bytes([ver_cmd, fam]) + len(block).to_bytes(2, "big") + block


def reason(data: bytes, accept: str = "any") -> str:
    """The one-line reason parse gives for refusing ``data``."""
    with pytest.raises(ProxyError) as caught:
        parse(data, accept)
    return str(caught.value)


def test_a_wrong_first_byte_shows_the_first_sixteen_bytes() -> None:
    """The message quotes exactly the first 16 bytes of what was received."""
    assert reason(b"GET / HTTP/1.0 and more\r\n") == (
        "not a PROXY header (starts with b'GET / HTTP/1.0 a')"
    )


def test_an_incomplete_line_with_a_wrong_prefix_says_so() -> None:
    """A v1 start that cannot become "PROXY " is refused before its CRLF, with its bytes."""
    assert reason(b"PX") == "not a PROXY header (starts with b'PX')"
    assert reason(b"PROXYY") == "not a PROXY header (starts with b'PROXYY')"


def test_a_short_address_block_gives_its_own_size() -> None:
    """The message names the block's size, the family and the size that family needs."""
    assert reason(v2(0x21, 0x11, bytes(8))) == (
        "PROXY v2 address block of 8 bytes is shorter than IPv4 needs (12)"
    )
    assert reason(v2(0x21, 0x21, bytes(20))) == (
        "PROXY v2 address block of 20 bytes is shorter than IPv6 needs (36)"
    )


@pytest.mark.parametrize(("ver_cmd", "shown"), [(0x22, "0x2"), (0x2F, "0xf")])
def test_an_unknown_command_is_named_by_its_low_nibble(ver_cmd: int, shown: str) -> None:
    """The command shown is the low four bits of the version/command byte, alone."""
    assert reason(v2(ver_cmd, 0x11, bytes(12))) == (f"PROXY v2 header with unknown command {shown}")


def test_a_checksum_followed_by_another_tlv_is_verified_in_place() -> None:
    """A CRC32C TLV that is not the last one is read as its own four bytes, and the bytes
    after it count towards the checksum."""
    block = bytes([203, 0, 113, 7, 192, 0, 2, 1]) + (51234).to_bytes(2, "big") + b"\x27\x0f"
    block += bytes([proxy._TLV_CRC32C, 0, 4]) + bytes(4) + bytes([0xE0, 0, 2]) + b"ab"
    zeroed = v2(0x21, 0x11, block)
    at = proxy.V2_FIXED + 12 + 3
    crc = proxy.crc32c(zeroed).to_bytes(4, "big")
    header = zeroed[:at] + crc + zeroed[at + 4 :]
    parsed = parse(header + b"data")
    assert parsed is not None
    assert (parsed.length, parsed.source) == (len(header), ("203.0.113.7", 51234))
    tampered = header[:-1] + b"c"
    assert reason(tampered) == "PROXY v2 header fails its CRC32C checksum"


@pytest.mark.parametrize(
    ("source", "destination"),
    [(None, None), (("203.0.113.7", 51234), None), (None, ("192.0.2.1", 9999))],
)
def test_the_builders_send_unknown_and_local_when_an_endpoint_is_missing(
    source: tuple[str, int] | None, destination: tuple[str, int] | None
) -> None:
    """Either endpoint missing gives v1 UNKNOWN and a v2 LOCAL header with an empty block."""
    assert proxy.v1_header(source, destination) == b"PROXY UNKNOWN\r\n"
    assert proxy.v2_header(source, destination) == SIG + b"\x20\x00\x00\x00"


def test_the_v2_builder_lays_out_a_proxy_header_byte_for_byte() -> None:
    """PROXY over TCP/IPv4: version 2, command 1, family 0x11, 12 address bytes."""
    header = proxy.v2_header(("203.0.113.7", 51234), ("192.0.2.1", 9999))
    assert header == SIG + b"\x21\x11\x00\x0c" + bytes([203, 0, 113, 7, 192, 0, 2, 1]) + (
        b"\xc8\x22\x27\x0f"
    )
