"""Red-team findings against the HTTP front of both services (issue 16), each replayed on a real
server over raw sockets where a client library would hide the attack:

(a) idle and slow connections: a connection that never finishes its headers, or its body, is
    closed (408 for a body); connections over the cap neither exhaust the file limit nor keep a
    normal request from being graded;
(b) the body limit cannot be dodged with ``Transfer-Encoding: chunked`` beside a small
    ``Content-Length``: both together are refused, chunked bodies are counted while they arrive;
(c) NaN, Infinity and lone surrogates in a JSON body get a 422 that names them, never a 500;
(d) a 422 never echoes the input back (a 60 MB reference came back whole).

Every wait is bounded (``WAIT_S``); nothing asserts on elapsed time.
"""

from __future__ import annotations

import json
import re
import resource
import select
import socket
from contextlib import ExitStack
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.helpers.procs import service, wait_for

TOKEN = "redteam-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAZE = "*****\n*S*E*\n*.*.*\n*...*\n*****"  # only D D R R U U leads from S to E
MAX_BODY = 256 * 1024  # the services' body limit in this suite
WAIT_S = 30  # the longest any single wait may take; the timeouts under test are 1 s
TIMEOUTS = {"HEADER_TIMEOUT_S": "1", "BODY_TIMEOUT_S": "1", "MAX_BODY_BYTES": str(MAX_BODY), "API_TOKEN": TOKEN}


@pytest.fixture(scope="module")
def verifier(tmp_path_factory):
    log = tmp_path_factory.mktemp("redteam") / "verifier.log"
    env = {f"PASSK_VERIFIER_{k}": v for k, v in TIMEOUTS.items()}
    with service(["serve", "verifier", "--no-queue", "--workers", "1"], log, env=env) as (process, url):
        yield process, url


@pytest.fixture(scope="module")
def replica(redis_server, tiny_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("redteam") / "rollout.log"
    args = ["serve", "rollout", "--model-dir", str(tiny_model), "--redis-url", redis_server.url]
    args += ["--replica", "redteam"]
    env = {f"PASSK_ROLLOUT_{k}": v for k, v in TIMEOUTS.items()}
    with service(args, log, env=env) as (process, url):
        yield process, url


# ----------------------------------------------------------------------------- raw HTTP helpers


def connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=WAIT_S)


def head(method: str, path: str, *lines: str) -> bytes:
    return "\r\n".join([f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *lines, "", ""]).encode()


def until_closed(sock: socket.socket, wait_s: float = WAIT_S) -> tuple[bool, bytes]:
    """Read until the server closes the connection: (closed, what it sent); closed is False when
    the connection was still open after ``wait_s`` without a byte."""
    sock.settimeout(wait_s)
    received = b""
    try:
        while data := sock.recv(65536):
            received += data
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False, received
    return True, received


def trickle(sock: socket.socket, data: bytes, pause_s: float = 0.2) -> tuple[bool, bytes]:
    """Send ``data`` a byte at a time, ``pause_s`` apart: (closed, what the server sent), closed as
    soon as the server closes the connection, False if it was still open after the last byte."""
    received = b""
    for byte in data:
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            return True, received + until_closed(sock, 1)[1]
        readable, _, _ = select.select([sock], [], [], pause_s)
        if readable:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return True, received
            if not chunk:
                return True, received
            received += chunk
    return False, received


def send_chunked(sock: socket.socket, request_head: bytes, body: bytes, piece: int = 64 * 1024) -> tuple[int, bytes]:
    """Send ``request_head``, then ``body`` as chunks of ``piece`` bytes, until all is sent or the
    server answers or closes: (body bytes sent, the server's reply)."""
    sock.sendall(request_head)
    sent = 0
    try:
        while sent < len(body):
            if select.select([sock], [], [], 0)[0]:
                break  # the server answered (or closed) before the end
            chunk = body[sent : sent + piece]
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            sent += len(chunk)
        else:
            sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    return sent, until_closed(sock)[1] if sent < len(body) else read_response(sock)


def read_response(sock: socket.socket) -> bytes:
    """One whole response (status line, headers and a Content-Length body), or what came before a close."""
    sock.settimeout(WAIT_S)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            if not (chunk := sock.recv(65536)):
                return data
            data += chunk
        header, _, body = data.partition(b"\r\n\r\n")
        length = int(m.group(1)) if (m := re.search(rb"(?im)^content-length:\s*(\d+)", header)) else 0
        while len(body) < length and (chunk := sock.recv(65536)):
            body += chunk
    except ConnectionResetError:
        return data
    return header + b"\r\n\r\n" + body


def status_of(reply: bytes) -> int | None:
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else None


def grade_maze(url: str) -> str:
    body = {"task": "maze", "reference": MAZE, "responses": ["<answer>DDRRUU</answer>"]}
    reply = httpx.post(f"{url}/v1/grade", json=body, headers=AUTH, timeout=WAIT_S)
    assert reply.status_code == 200, reply.text[:500]
    return reply.json()["verdicts"][0]["status"]


# ----------------------------------------------------------------------------- (a) idle and slow connections


@pytest.mark.parametrize("which", ["verifier", "replica"])
def test_a_silent_connection_is_closed(request, which):
    _, url = request.getfixturevalue(which)
    with connect(url) as sock:
        closed, _ = until_closed(sock)
    assert closed, f"the {which} kept a connection that sent nothing open for {WAIT_S} s"


def test_headers_sent_a_byte_at_a_time_are_cut_off(verifier):
    _, url = verifier
    slow = head("POST", "/v1/grade", f"Authorization: Bearer {TOKEN}", "X-Pad: " + "a" * 80)
    with connect(url) as sock:
        closed, _ = trickle(sock, slow)
    assert closed, "a slowloris client finished sending its headers over minutes without being cut off"


def test_a_keep_alive_connection_trickling_its_next_request_is_cut_off(verifier):
    _, url = verifier
    with connect(url) as sock:
        sock.sendall(head("GET", "/healthz"))
        assert status_of(read_response(sock)) == 200
        closed, _ = trickle(sock, head("GET", "/healthz", "X-Pad: " + "a" * 100))
    assert closed, "the next request's headers on a kept-alive connection had no deadline"


@pytest.mark.parametrize("pace", ["stalled", "trickled"])
def test_a_body_that_does_not_arrive_in_time_gets_408(verifier, pace):
    _, url = verifier
    body = json.dumps({"task": "maze", "reference": MAZE, "responses": ["<answer>DDRRUU</answer>"] * 3}).encode()
    lines = [f"Authorization: Bearer {TOKEN}", "Content-Type: application/json", f"Content-Length: {len(body)}"]
    with connect(url) as sock:
        sock.sendall(head("POST", "/v1/grade", *lines) + body[:10])
        closed, reply = until_closed(sock) if pace == "stalled" else trickle(sock, body[10:])
    assert closed and status_of(reply) == 408, reply[:300]
    assert grade_maze(url) == "correct"


def open_files_limit(pid: int) -> tuple[str, str]:
    line = next(ln for ln in Path(f"/proc/{pid}/limits").read_text().splitlines() if ln.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    return soft, hard


def test_idle_connections_over_the_cap_neither_exhaust_files_nor_block_grading(tmp_path):
    """The service starts with a soft file limit of 128 (as a container's default of 1024 was for
    ~1,100 connections): it raises it to the hard limit, keeps at most 32 connections, closing
    idle ones for newcomers, and grades a normal request while 200 idle connections knock."""
    cap, knocking, low = 32, 200, 128
    env = {"PASSK_VERIFIER_MAX_CONNECTIONS": str(cap), "PASSK_VERIFIER_HEADER_TIMEOUT_S": "600"}
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with ExitStack() as stack:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(low, hard), hard))  # inherited by the service
        try:
            process, url = stack.enter_context(
                service(["serve", "verifier", "--no-queue", "--workers", "1"], tmp_path / "verifier.log", env=env)
            )
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        idle = [stack.enter_context(connect(url)) for _ in range(knocking)]
        assert grade_maze(url) == "correct"
        assert httpx.get(f"{url}/healthz", timeout=WAIT_S).status_code == 200

        def closed_count() -> int:
            for sock in idle:
                sock.setblocking(False)
            closed = 0
            for sock in idle:
                try:
                    closed += sock.recv(1) == b""
                except BlockingIOError:
                    pass
                except ConnectionResetError:
                    closed += 1
            return closed

        assert wait_for(lambda: closed_count() >= knocking - cap, timeout_s=WAIT_S)
        soft_now, hard_now = open_files_limit(process.pid)
        assert soft_now == hard_now, "the service kept the soft open-files limit it was started with"


# ----------------------------------------------------------------------------- (b) body framing and size


def grade_body(size: int) -> bytes:
    """A valid grade request of about ``size`` bytes (one long, wrong answer)."""
    skeleton = {"task": "maze", "reference": MAZE, "responses": ["<answer>DDRRUU</answer>", ""]}
    filler = size - len(json.dumps(skeleton))
    return json.dumps({**skeleton, "responses": ["<answer>DDRRUU</answer>", "R" * max(filler, 0)]}).encode()


def test_content_length_beside_chunked_is_refused(verifier):
    _, url = verifier
    body = grade_body(32 * 1024 * 1024)  # 128x the limit
    lines = [f"Authorization: Bearer {TOKEN}", "Content-Type: application/json", "Content-Length: 100"]
    with connect(url) as sock:
        sent, reply = send_chunked(sock, head("POST", "/v1/grade", *lines, "Transfer-Encoding: chunked"), body)
    assert status_of(reply) == 400 and b"Transfer-Encoding" in reply, reply[:300]
    assert sent < len(body), "the whole body was read before the answer"


def test_a_chunked_body_is_counted_while_it_arrives(verifier):
    _, url = verifier
    lines = [f"Authorization: Bearer {TOKEN}", "Content-Type: application/json", "Transfer-Encoding: chunked"]
    small = grade_body(MAX_BODY // 2)
    with connect(url) as sock:
        _, reply = send_chunked(sock, head("POST", "/v1/grade", *lines), small, piece=4096)
    assert status_of(reply) == 200 and b'"correct"' in reply, reply[:300]
    big = grade_body(32 * 1024 * 1024)
    with connect(url) as sock:
        sent, reply = send_chunked(sock, head("POST", "/v1/grade", *lines), big)
    assert status_of(reply) == 413 and f"over {MAX_BODY} bytes".encode() in reply, reply[:300]
    assert sent < len(big), "the whole body was read before the answer"


def test_content_length_over_the_limit_is_refused_before_the_body(verifier):
    _, url = verifier
    lines = [f"Authorization: Bearer {TOKEN}", "Content-Type: application/json", f"Content-Length: {MAX_BODY + 1}"]
    with connect(url) as sock:
        sock.sendall(head("POST", "/v1/grade", *lines))
        reply = read_response(sock)
    assert status_of(reply) == 413, reply[:300]


# ----------------------------------------------------------------------------- (c) JSON the encoder cannot take back

# Request bodies as JSON text with @ where the poison goes: json.dumps would refuse NaN only with
# allow_nan=False, and writes lone surrogates as the \udcff escapes an attacker sends.
POISONS = {"NaN": "NaN", "Infinity": "Infinity", "-Infinity": "-Infinity", "surrogate": '"x\\udcff"'}
PLACES = {
    "/v1/grade": {
        "task": '{"task": @, "reference": "S.E", "responses": ["R"]}',
        "reference": '{"task": "maze", "reference": @, "responses": ["R"]}',
        "responses": '{"task": "maze", "reference": "S.E", "responses": ["R", @]}',
        "extra value": '{"task": "maze", "reference": "S.E", "responses": ["R"], "x": @}',
    },
    "/v1/generate": {
        "prompt": '{"prompt": @, "sampling": {"max_tokens": 1}}',
        "n": '{"prompt": "S.E", "n": @, "sampling": {"max_tokens": 1}}',
        "temperature": '{"prompt": "S.E", "sampling": {"max_tokens": 1, "temperature": @}}',
        "stop": '{"prompt": "S.E", "sampling": {"max_tokens": 1, "stop": [@]}}',
        "extra value": '{"prompt": "S.E", "sampling": {"max_tokens": 1}, "x": @}',
    },
    "/v1/completions": {
        "prompt": '{"prompt": @, "max_tokens": 1}',
        "temperature": '{"prompt": "S.E", "max_tokens": 1, "temperature": @}',
        "stop": '{"prompt": "S.E", "max_tokens": 1, "stop": [@]}',
        "extra value": '{"prompt": "S.E", "max_tokens": 1, "x": @}',
    },
}
EXTRA_KEYS = {
    "/v1/grade": '{"task": "maze", "reference": "S.E", "responses": ["R"], "x\\udcff": 1}',
    "/v1/generate": '{"prompt": "S.E", "sampling": {"max_tokens": 1}, "x\\udcff": 1}',
    "/v1/completions": '{"prompt": "S.E", "max_tokens": 1, "x\\udcff": 1}',
}
POISONED = [
    *(
        pytest.param(path, text.replace("@", poison), name, id=f"{path}-{where}-{name}")
        for path, places in PLACES.items()
        for where, text in places.items()
        for name, poison in POISONS.items()
    ),
    *(pytest.param(path, text, "surrogate", id=f"{path}-extra key-surrogate") for path, text in EXTRA_KEYS.items()),
]


@pytest.mark.parametrize(("path", "text", "poison"), POISONED)
def test_json_the_encoder_cannot_take_back_gets_a_422_naming_it(request, path, text, poison):
    _, url = request.getfixturevalue("verifier" if path == "/v1/grade" else "replica")
    headers = {**AUTH, "Content-Type": "application/json"}
    reply = httpx.post(f"{url}{path}", content=text.encode(), headers=headers, timeout=WAIT_S)
    assert reply.status_code == 422, (reply.status_code, reply.text[:300])
    assert poison in reply.text, reply.text[:300]


# ----------------------------------------------------------------------------- (d) no echo


def test_an_overlong_reference_gets_a_small_422_without_it(verifier):
    _, url = verifier
    reference = "*S.E*" * 40_000  # 200,000 characters, over the 65,536 a reference may have
    body = {"task": "maze", "reference": reference, "responses": ["<answer>DDRRUU</answer>"]}
    reply = httpx.post(f"{url}/v1/grade", json=body, headers=AUTH, timeout=WAIT_S)
    assert reply.status_code == 422 and "reference" in reply.text
    assert len(reply.content) < 10_000 and "*S.E**S.E*" not in reply.text, len(reply.content)
