"""A TLS front for the local RabbitMQ, for the amqps:// tests: terminate TLS on a port of
127.0.0.1 and forward the bytes to the plain AMQP port.

    python tests/tls_proxy.py CERT KEY LISTEN_PORT [TARGET_PORT]
"""

from __future__ import annotations

import asyncio
import ssl
import sys


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


async def main(cert: str, key: str, port: int, target: int) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", port, ssl=context)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    target_port = int(sys.argv[4]) if len(sys.argv) > 4 else 5672
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), target_port))
