"""A real WebSocket peer for the proxy's tests (python3-websockets).

    websocket.py serve HOST PORT   echo every message back until killed
    websocket.py client URI        send messages through URI, check each
                                   echo, print "ok"; exit 1 on a mismatch
"""

import asyncio
import sys

import websockets


async def echo(connection, *_path):
    async for message in connection:
        await connection.send(message)


async def serve(host, port):
    async with websockets.serve(echo, host, port, max_size=None):
        print("listening", flush=True)
        await asyncio.Future()


async def client(uri):
    messages = ["hello", b"\x00\x01" * 100_000] + [f"message {i}" for i in range(50)]
    async with websockets.connect(uri, max_size=None) as connection:
        for message in messages:
            await connection.send(message)
            answer = await connection.recv()
            if answer != message:
                print(f"sent {message[:40]!r}, got back {answer[:40]!r}")
                sys.exit(1)
        pong = await connection.ping()
        await pong
    print("ok")


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        asyncio.run(serve(sys.argv[2], int(sys.argv[3])))
    else:
        asyncio.run(client(sys.argv[2]))
