"""A service backend for the lab: answers with its pod and cluster, and has a health endpoint.

Run by `lab service add` inside a pod, as a script (standard library only, so it starts fast
and small):

    python backend.py --pod web1 --cluster east --port 8080 --flag FILE --ready FILE [--udp]

TCP: HTTP on PORT, `GET /` -> "pod=web1 cluster=east\\n", `GET /health` -> 200, or 503 while
FILE exists (`lab service fail POD` creates it; Consul's HTTP check then goes critical).
UDP: every datagram to PORT gets that text back; the HTTP health endpoint is on a port of its
own (chosen by the kernel). Once listening it writes {"pid", "health_port"} to the ready file;
a port already in use ends it with exit code 3 and one line on stderr.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Server(ThreadingHTTPServer):
    request_queue_size = 512  # bursts of new connections through a VIP
    daemon_threads = True


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pod", required=True)
    ap.add_argument("--cluster", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--udp", action="store_true")
    ap.add_argument("--flag", required=True, help="while this file exists, /health answers 503")
    ap.add_argument("--ready", required=True, help="written once listening")
    a = ap.parse_args()
    text = f"pod={a.pod} cluster={a.cluster}\n".encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path.startswith("/health"):
                failing = os.path.exists(a.flag)
                self._send(503 if failing else 200, b"failing\n" if failing else b"ok\n")
            elif self.path == "/" and not a.udp:
                self._send(200, text)
            else:
                self._send(404, b"not found\n")

        def _send(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
            pass

    proto = "udp" if a.udp else "tcp"
    try:
        http = _Server(("0.0.0.0", 0 if a.udp else a.port), Handler)
        udp = None
        if a.udp:
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("0.0.0.0", a.port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            print(f"port {a.port}/{proto} is already in use in pod {a.pod}", file=sys.stderr)
            return 3
        raise
    tmp = f"{a.ready}.tmp"
    with open(tmp, "w") as f:
        json.dump({"pid": os.getpid(), "health_port": http.server_address[1]}, f)
    os.replace(tmp, a.ready)
    if udp is None:
        http.serve_forever()
        return 0
    threading.Thread(target=http.serve_forever, daemon=True).start()
    while True:
        _, peer = udp.recvfrom(2048)
        udp.sendto(text, peer)


if __name__ == "__main__":
    sys.exit(main())
