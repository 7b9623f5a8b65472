"""HTTP to inference servers, shared by every server-backed engine (light: the standard library).

One transport (urllib, injectable so clients are tested against recorded bodies without a server),
one retry rule (connection errors and 502/503/504, exponential backoff) and one health probe
(GET /health -> 200), so a new server-backed engine writes none of them again.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

Transport = Callable[[str, str, "dict | None", float], tuple[int, Any]]
"""(method, url, json body or None, timeout s) -> (HTTP status, parsed JSON or text). Raises
ConnectionError / TimeoutError / OSError when the server cannot be reached."""

RETRY_STATUS = (502, 503, 504)
"""Answers worth retrying: a proxy or a server still starting or overloaded."""


class ServerError(RuntimeError):
    """The server answered, but not as the protocol requires (an engine subclasses it)."""


def urllib_transport(method: str, url: str, body: dict | None, timeout_s: float) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:  # an HTTP answer (4xx/5xx): not a connection problem
        status, raw = e.code, e.read()
    except urllib.error.URLError as e:
        raise ConnectionError(f"{method} {url}: {e.reason}") from e
    except (http.client.HTTPException, socket.timeout) as e:
        raise ConnectionError(f"{method} {url}: {type(e).__name__}: {e}") from e
    text = raw.decode("utf-8", errors="replace")
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def request_with_retry(
    transport: Transport,
    method: str,
    url: str,
    body: dict | None,
    *,
    timeout_s: float,
    retries: int,
    backoff_s: float,
    error_cls: type[ServerError] = ServerError,
    health_url: str | None = None,
    what: str = "server",
) -> Any:
    """The payload of a 200 answer; another HTTP status raises `error_cls` at once unless it is in
    RETRY_STATUS; unreachable servers and retryable answers are retried `retries` times with
    exponential backoff, then ConnectionError names the health URL to check."""
    last: Exception | None = None
    for attempt in range(retries + 1):
        try:
            status, payload = transport(method, url, body, timeout_s)
        except (ConnectionError, TimeoutError, OSError) as e:
            last = e
        else:
            if status == 200:
                return payload
            if status not in RETRY_STATUS:
                raise error_cls(f"{method} {url} returned HTTP {status}: {str(payload)[:500]}")
            last = error_cls(f"HTTP {status}: {str(payload)[:200]}")
        if attempt < retries:
            time.sleep(backoff_s * 2**attempt)
    health = health_url or f"{url.rsplit('/', 1)[0]}/health"
    raise ConnectionError(
        f"{method} {url} failed after {retries + 1} attempts (last: {last}); is the {what} up? "
        f"check `curl {health}` and the server's log"
    ) from last


def health(transport: Transport, urls: Sequence[str], *, timeout_s: float = 10.0) -> dict[str, bool]:
    """GET /health on every server (one attempt each): url -> answered 200."""
    out = {}
    for u in urls:
        try:
            out[u] = transport("GET", f"{u}/health", None, timeout_s)[0] == 200
        except (ConnectionError, TimeoutError, OSError):
            out[u] = False
    return out


def wait_until_healthy(
    transport: Transport, urls: Sequence[str], *, timeout_s: float = 600.0, poll_s: float = 5.0, what: str = "servers"
) -> None:
    """Poll /health until every server answers 200; ConnectionError with each one's state after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = health(transport, urls)
        if all(status.values()):
            return
        if time.monotonic() > deadline:
            raise ConnectionError(f"{what} not healthy after {timeout_s} s: {status}")
        time.sleep(poll_s)
