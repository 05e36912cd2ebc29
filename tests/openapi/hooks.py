"""Schemathesis hooks for the retro-fleet conformance run (tests/openapi.rs).

- `application/jsonl`: batch files are JSON Lines; generated values are
  written one JSON document per line (a string is sent as it is).
- `no_server_error` replaces schemathesis' `not_a_server_error` with one
  exception: a 504 for a request that set its own deadline (`timeout_ms`) is
  the answer the caller asked for when that deadline passes, not a fault.
  A request id is an idempotency key, so a later request reusing the id of
  one that set `timeout_ms` (the stateful phase reuses ids it saw) is
  answered that first result, and may be the same 504. Every other 5xx
  fails the run.
- `ast.parse` is serialised: the run uses two worker threads, and before
  CPython 3.11.8 the AST validator kept one recursion counter for all
  threads, so two parses at once could fail with "AST constructor recursion
  depth mismatch" (hypothesis parses lambdas to describe strategies). That
  is a fault of the Python running schemathesis, not of the API.
"""

import ast
import json
import threading

import schemathesis

_parse, _parsing = ast.parse, threading.Lock()


def _serial_parse(*args, **kwargs):
    with _parsing:
        return _parse(*args, **kwargs)


ast.parse = _serial_parse


@schemathesis.serializer("application/jsonl")
def jsonl(ctx, value):
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    items = value if isinstance(value, list) else [value]
    return "".join(json.dumps(v) + "\n" for v in items).encode("utf-8")


# request ids of requests that set their own deadline
DEADLINED = set()


def request_id(case, body):
    headers = {str(k).lower(): v for k, v in (case.headers or {}).items()}
    rid = body.get("id") or headers.get("x-request-id")
    return rid if isinstance(rid, str) else None


@schemathesis.check
def no_server_error(ctx, response, case):
    status = response.status_code
    body = case.body if isinstance(case.body, dict) else {}
    rid = request_id(case, body)
    if "timeout_ms" in body and rid:
        DEADLINED.add(rid)
    if status < 500:
        return None
    if status == 504 and ("timeout_ms" in body or rid in DEADLINED):
        return None
    raise AssertionError(f"server error {status} on {case.method} {case.path}: {response.text[:500]}")
