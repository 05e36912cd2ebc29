#!/usr/bin/env python3
"""An OTLP/HTTP sink for benchmarks: accepts every export on /v1/traces and
answers 200, counting exports and bytes (printed on SIGTERM or Ctrl-C).

Usage: scripts/otlp-sink.py PORT
"""
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

exports = 0
received = 0


class Sink(BaseHTTPRequestHandler):
    def do_POST(self):
        global exports, received
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        exports += 1
        received += len(body)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def report(*_):
    print(f"otlp-sink: {exports} exports, {received} bytes", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    signal.signal(signal.SIGTERM, report)
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        report()
