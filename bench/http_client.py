"""A lean HTTP/1.1 keep-alive client on asyncio streams, for load generation.

The load generator shares the benchmark machine's cores with the server it measures; httpx spends
about 2 ms of CPU per request there, more than the server's own HTTP handling. This client does the
minimum a correct HTTP/1.1 exchange needs (one connection, Content-Length or chunked bodies) so the
measurement is of the server, not of the client.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any


class HTTPError(Exception):
    """The connection failed or the response was not valid HTTP/1.1."""


class KeepAliveClient:
    """One persistent connection to host:port; requests on it run one at a time."""

    def __init__(self, host: str, port: int, timeout: float = 120.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        assert self._reader is not None and self._writer is not None
        return self._reader, self._writer

    async def request(self, method: str, path: str, body: bytes = b"", content_type: str = "application/json") -> tuple[int, bytes]:
        """Send one request and return (status, body); reconnects once if the server closed the connection."""
        async with self._lock:
            try:
                return await asyncio.wait_for(self._exchange(method, path, body, content_type), self.timeout)
            except (ConnectionError, asyncio.IncompleteReadError, TimeoutError) as exc:
                await self.close()
                raise HTTPError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc

    async def post_stream(self, path: str, body: bytes, on_chunk: Callable[[bytes], None],
                          timeout: float | None = None) -> tuple[int, bytes]:
        """POST a JSON body and hand each chunk of a 200 chunked answer (one write of the server: one server-sent
        event, usually) to `on_chunk` as it arrives; returns (200, b"") then, or (status, body) for any other
        answer (an error's problem JSON). HTTPError on a failed connection or after `timeout` seconds (default:
        the client's); a caller cancelled mid-answer leaves the connection closed (its state is unknown)."""
        async with self._lock:
            try:
                async with asyncio.timeout(self.timeout if timeout is None else timeout):
                    return await self._stream(path, body, on_chunk)
            except (ConnectionError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
                await self.close()
                raise HTTPError(f"POST {path} (stream): {type(exc).__name__}: {exc}") from exc
            except BaseException:
                self.abort()
                raise

    async def _stream(self, path: str, body: bytes, on_chunk: Callable[[bytes], None]) -> tuple[int, bytes]:
        reader, writer = await self._connect()
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        status, headers = _parse_head(await reader.readuntil(b"\r\n\r\n"))
        if headers.get("transfer-encoding", "").lower() != "chunked":
            data = await reader.readexactly(int(headers.get("content-length", "0")))
        elif status != 200:
            data = await _read_chunked(reader)
        else:
            data = b""
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                on_chunk((await reader.readexactly(size + 2))[:-2])  # the chunk and its CRLF in one read
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, data

    async def post_json(self, path: str, payload: Any) -> tuple[int, bytes]:
        return await self.request("POST", path, json.dumps(payload).encode())

    async def get(self, path: str) -> tuple[int, bytes]:
        return await self.request("GET", path)

    async def _exchange(self, method: str, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        reader, writer = await self._connect()
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        if body or method in ("POST", "PUT"):
            head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        writer.write(head.encode() + b"\r\n" + body)
        await writer.drain()
        status_line, headers = _parse_head(await reader.readuntil(b"\r\n\r\n"))
        if headers.get("transfer-encoding", "").lower() == "chunked":
            data = await _read_chunked(reader)
        else:
            data = await reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status_line, data

    def abort(self) -> None:
        """Drop the connection now, without waiting (a cancelled exchange)."""
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass


def _parse_head(raw: bytes) -> tuple[int, dict[str, str]]:
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise HTTPError(f"not an HTTP/1.x status line: {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    out = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # no trailers expected: the blank line that ends the body
            return bytes(out)
        out += await reader.readexactly(size)
        await reader.readexactly(2)
