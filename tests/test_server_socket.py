"""The explorer's listening socket: its connections must send without Nagle's delay."""

from __future__ import annotations

import asyncio
import socket
from concurrent.futures import ThreadPoolExecutor

from lurker.server.serve import bind


def _accepted_nodelay(listener: socket.socket) -> int:
    """TCP_NODELAY of a connection accepted on ``listener`` by asyncio, as uvicorn serves
    the sockets ``lurker serve`` binds (``loop.create_server(sock=...)``)."""

    async def main() -> int:
        loop = asyncio.get_running_loop()
        seen: asyncio.Future[int] = loop.create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                sock = transport.get_extra_info("socket")
                seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await loop.create_server(Probe, sock=listener)
        port = listener.getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            return await asyncio.wait_for(seen, 10)
        finally:
            writer.close()
            server.close()
            await server.wait_closed()

    # in a thread of its own: a browser test's sync Playwright may leave this thread
    # with a running event loop, where asyncio.run() refuses to start
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(main())).result()


def test_served_connections_disable_nagle() -> None:
    # Without TCP_NODELAY every response after the first on a keep-alive connection
    # (uvicorn writes the headers and the body separately) waited for the client's delayed
    # ACK, ~40 ms: a Live page of 2,048 map tiles or a layer page of thumbnails took
    # seconds. asyncio sets the option only when the socket's proto says TCP.
    listener = bind("127.0.0.1", 0)
    assert listener.proto == socket.IPPROTO_TCP
    listener.listen(8)
    assert _accepted_nodelay(listener) != 0
