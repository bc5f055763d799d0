"""Fixtures shared by the unit tests."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket, Any]]:
    """A connected (client, server side, peer address) over 127.0.0.1."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=10)
        server_side, peer = listener.accept()
    yield client, server_side, peer
    client.close()
    server_side.close()
