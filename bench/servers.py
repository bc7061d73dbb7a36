"""Peers for the benchmark, each run as its own process:

  python bench/servers.py bare      a bare aiosmtpd server whose handler only answers 250
  python bench/servers.py sink      an SMTP sink that logs "<time> <Subject>" per mail to --log
  python bench/servers.py provider  a CM-compatible HTTP gateway that accepts everything at once
  python bench/servers.py hooks     a bare aiohttp server answering 200 "OK" to any GET (the
                                    limit for mailbridge's callback receiver)

Each prints "PORT <n>" on its first line of stdout once listening. The
provider answers GET /stats with {"requests", "messages", "first", "last"}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


class BareHandler:
    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 OK"


class SinkHandler:
    def __init__(self, log_path: str) -> None:
        self.log = open(log_path, "a", buffering=1)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        subject = ""
        for line in content.split(b"\r\n", 20):
            if line.lower().startswith(b"subject:"):
                subject = line[8:].strip().decode("latin-1")
                break
        self.log.write(f"{time.time():.6f} {subject}\n")
        return "250 OK"


async def smtp_server(handler: Any) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="bench.test", data_size_limit=None), "127.0.0.1", 0
    )
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


class Provider:
    """Just enough of CM's JSON gateway: every message accepted at once."""

    def __init__(self) -> None:
        self.requests = 0
        self.messages = 0
        self.first = 0.0
        self.last = 0.0

    def answer(self, body: bytes) -> bytes:
        doc = json.loads(body)
        results = []
        for msg in doc["messages"]["msg"]:
            for to in msg["to"]:
                results.append(
                    {"to": to["number"], "status": "Accepted", "reference": msg.get("reference"),
                     "parts": 1, "messageDetails": None, "messageErrorCode": 0}
                )  # fmt: skip
        now = time.time()
        self.requests += 1
        self.messages += len(results)
        self.first = self.first or now
        self.last = now
        return json.dumps(
            {"details": f"Created {len(results)} message(s)", "errorCode": 0, "messages": results}
        ).encode()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (h.partition(":") for h in header_lines if h)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                if request_line.startswith("GET /stats"):
                    payload = json.dumps(
                        {"requests": self.requests, "messages": self.messages,
                         "first": self.first, "last": self.last}
                    ).encode()  # fmt: skip
                elif request_line.startswith("POST /reset"):
                    self.requests = self.messages = 0
                    self.first = self.last = 0.0
                    payload = b"{}"
                else:
                    payload = self.answer(body)
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def provider_server() -> None:
    provider = Provider()
    server = await asyncio.start_server(provider.serve, "127.0.0.1", 0)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


async def hooks_server() -> None:
    from aiohttp import web

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="OK")

    app = web.Application()
    app.router.add_get("/{tail:.*}", ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert server is not None and isinstance(server, asyncio.base_events.Server)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["bare", "sink", "provider", "hooks"])
    parser.add_argument("--log", default="/dev/null")
    args = parser.parse_args()
    if args.kind == "bare":
        asyncio.run(smtp_server(BareHandler()))
    elif args.kind == "sink":
        asyncio.run(smtp_server(SinkHandler(args.log)))
    elif args.kind == "hooks":
        asyncio.run(hooks_server())
    else:
        asyncio.run(provider_server())
    return 0


if __name__ == "__main__":
    sys.exit(main())
