"""A fault-injecting HTTP proxy for tests: in front of an S3 endpoint (moto), it fails some requests.

Every request gets a number, 0, 1, 2, ... in the order they arrive. Of every `period` requests, the one
numbered `period // 3` (mod `period`) gets a `500 InternalError` answer and the one numbered
`2 * period // 3` has its connection closed without an answer (GET and HEAD only: a client may not know
whether a dropped write was done, and S3 clients retry only idempotent requests after a drop). Neither
is forwarded, so the store never sees a failed request. Everything else is forwarded as it came (the
Host header too: the request's signature covers it) and the answer is passed back.

Retried requests arrive with new numbers, so a client that retries gets through; one that does not
fails. `counts` says what happened, for the test to check that faults were really injected.
"""
from __future__ import annotations

import http.client
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}
ERROR_BODY = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
              b"<Message>We encountered an internal error. Please try again.</Message></Error>")


class FaultProxy:
    """`with FaultProxy("http://127.0.0.1:PORT") as proxy:` then point clients at `proxy.url`."""

    def __init__(self, target: str, period: int = 8):
        self.target = urlsplit(target)
        self.period = period
        self.counts: Counter = Counter()
        self._lock = threading.Lock()
        self._number = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="fault-proxy", daemon=True)

    def __enter__(self) -> "FaultProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    def verdict(self, method: str) -> str:
        """What happens to the next request: "500", "drop" or "forward"."""
        with self._lock:
            number, self._number = self._number, self._number + 1
        phase = number % self.period
        if phase == self.period // 3:
            fate = "500"
        elif phase == 2 * self.period // 3 and method in ("GET", "HEAD"):
            fate = "drop"
        else:
            fate = "forward"
        with self._lock:
            self.counts[fate] += 1
        return fate

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _serve(self) -> None:
                body = self._body()
                fate = proxy.verdict(self.command)
                if fate == "drop":
                    self.close_connection = True
                    return
                if fate == "500":
                    self._answer(500, [("Content-Type", "application/xml")], ERROR_BODY)
                    return
                status, headers, data = proxy.forward(self.command, self.path, self.headers, body)
                self._answer(status, headers, data)

            def _body(self) -> bytes:
                if "chunked" not in (self.headers.get("Transfer-Encoding") or "").lower():
                    length = int(self.headers.get("Content-Length") or 0)
                    return self.rfile.read(length) if length else b""
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return b"".join(chunks)

            def _answer(self, status: int, headers: list, data: bytes) -> None:
                self.send_response(status)
                head = self.command == "HEAD"  # a HEAD answer keeps the length of what a GET would send
                for name, value in headers:
                    if name.lower() not in HOP_BY_HOP and (head or name.lower() != "content-length"):
                        self.send_header(name, value)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve

        return Handler

    def forward(self, method: str, path: str, headers, body: bytes) -> tuple[int, list, bytes]:
        connection = http.client.HTTPConnection(self.target.hostname, self.target.port, timeout=60)
        try:
            sent = {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP | {"expect", "content-length"}}
            if body or method in ("PUT", "POST"):
                sent["Content-Length"] = str(len(body))
            connection.request(method, path, body=body, headers=sent)
            response = connection.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            connection.close()
