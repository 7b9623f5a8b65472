"""A stand-in for an SGLang server in tests: answers GET /health with 503 until `--ready-after`
seconds have passed, then 200. `--exit-after S` makes it die (exit code 3) after S seconds."""

import argparse
import http.server
import sys
import threading
import time

ap = argparse.ArgumentParser()
ap.add_argument("--port", type=int, required=True)
ap.add_argument("--ready-after", type=float, default=0.0)
ap.add_argument("--exit-after", type=float, default=None)
a = ap.parse_args()
t0 = time.monotonic()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        ok = self.path == "/health" and time.monotonic() - t0 >= a.ready_after
        self.send_response(200 if ok else 503)
        self.end_headers()
        self.wfile.write(b"ok" if ok else b"loading")

    def log_message(self, *args):
        pass


if a.exit_after is not None:

    def _die():
        time.sleep(a.exit_after)
        print("fake server: exiting on purpose", flush=True)
        import os

        os._exit(3)

    threading.Thread(target=_die, daemon=True).start()
print(f"fake server on port {a.port}", flush=True)
sys.stdout.flush()
http.server.ThreadingHTTPServer(("127.0.0.1", a.port), Handler).serve_forever()
