"""The API's edge under hostile input and a Redis outage (issue #16, items 1, 2 and 5), against real parts.

Chaos cases: oversized bodies (a declared 400 MB body, an unbounded chunked one, uploads over each purpose's
limit, too many items) and hostile ids (separators, over-long, non-ASCII, in every path, query and header that
takes one) are refused with a 4xx that names the limit or the rule, before the body is read, on a keep-alive
connection that stays usable; corrupted job state answers a JSON 500 with a request id; with Redis stopped,
reads answer 503 with Retry-After at once, and recover when Redis is back.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import select
import socket
import time
import uuid
from pathlib import Path
from urllib.parse import quote, urlparse

import httpx
import pytest
from service_helpers import KEYS, RedisServer, start_api, stop, wait_until

from hscr_client._models import ID_RULE

INLINE_LIMIT, ITEMS_FILE_LIMIT, IMAGE_LIMIT = 200_000, 300_000, 100_000
SMALL_LIMITS = {"HSCR_MAX_INLINE_REQUEST_BYTES": str(INLINE_LIMIT), "HSCR_MAX_ITEMS_FILE_BYTES": str(ITEMS_FILE_LIMIT),
                "HSCR_MAX_IMAGE_BYTES": str(IMAGE_LIMIT)}
MIB = 1024 * 1024
AUTH = {"Authorization": f"Bearer {KEYS['alice']}"}


def png(width: int, height: int, *, noise: bool = False) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8) if noise else \
        np.zeros((height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def peak_rss(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def raw_exchange(base_url: str, head: str, body_blocks=(), timeout: float = 20) -> tuple[int, dict, bytes, int,
                                                                                         float]:
    """Send a request head, then body blocks until the server answers (or the blocks run out). Returns the status,
    headers and body of the answer, the body bytes sent and the seconds until the answer. A raw socket: what
    matters is what the server does before the body has arrived."""
    address = urlparse(base_url)
    sock = socket.create_connection((address.hostname, address.port), timeout=timeout)
    started = time.monotonic()
    sent = 0
    try:
        sock.sendall(head.encode())
        for block in body_blocks:
            if select.select([sock], [], [], 0)[0]:  # the server has answered: stop sending
                break
            try:
                sock.sendall(block)
            except (BrokenPipeError, ConnectionResetError):
                break  # it answered and closed; the answer is still readable
            sent += len(block)
        response = http.client.HTTPResponse(sock)
        response.begin()
        elapsed = time.monotonic() - started
        return response.status, dict(response.getheaders()), response.read(), sent, elapsed
    finally:
        sock.close()


@pytest.fixture(scope="module")
def small_api(stack_env):
    """An API with small body limits, on a queue no worker serves; yields (base URL, its process id)."""
    process, url = start_api(stack_env, "small-limits-api", HSCR_QUEUE="hscr-edge-limits", **SMALL_LIMITS)
    yield url, process.pid
    stop(process)


# --- oversized bodies ---------------------------------------------------------------------------------------

def test_declared_oversized_body_is_refused_before_it_is_read(small_api):
    url, pid = small_api
    before = peak_rss(pid)
    for expect in ("", "Expect: 100-continue\r\n"):
        head = (f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH['Authorization']}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {400 * MIB}\r\n{expect}\r\n")
        status, headers, body, _, elapsed = raw_exchange(url, head, [b"{" + b" " * 1023])  # 1 KB of 400 MB
        assert status == 413, (status, body[:300])  # not 100 Continue: the body is never asked for
        assert elapsed < 2, elapsed
        print(f"\ndeclared 400 MB body {expect.strip() or '(no Expect)'}: 413 after {elapsed * 1000:.0f} ms")
        error = json.loads(body)["error"]
        assert "HSCR_MAX_INLINE_REQUEST_BYTES" in error["message"] and error["request_id"] == headers["x-request-id"]
    print(f"API peak memory grew by {(peak_rss(pid) - before) / MIB:.1f} MiB")
    assert peak_rss(pid) - before < 10 * MIB
    answer = httpx.post(f"{url}/v1/jobs", headers={**AUTH, "Content-Type": "application/json"},
                        content=b"{" + b" " * (INLINE_LIMIT + 10) + b"}")
    assert answer.status_code == 413
    message = answer.json()["error"]["message"]
    assert f"over {INLINE_LIMIT} bytes" in message and "HSCR_MAX_INLINE_REQUEST_BYTES" in message, message
    assert "POST /v1/files" in message  # and what to do instead
    assert answer.json()["error"]["request_id"] == answer.headers["X-Request-ID"]


def test_chunked_body_is_counted_while_it_streams(small_api):
    url, pid = small_api
    before = peak_rss(pid)
    block = b'{"image": "data:image/png;base64,AAAA", "question": "q"}, ' * 1000  # ~57 KB
    blocks = [b"%x\r\n%s\r\n" % (len(block), block)] * (64 * MIB // len(block))  # up to 64 MB, chunked
    head = (f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH['Authorization']}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    status, _, body, sent, _ = raw_exchange(url, head, [b'5\r\n{"ite\r\n', *blocks])
    assert status == 413, (status, body[:300])
    assert "HSCR_MAX_INLINE_REQUEST_BYTES" in json.loads(body)["error"]["message"]
    print(f"\nchunked body: 413 after {sent / 1024:.0f} KiB sent (limit {INLINE_LIMIT / 1024:.0f} KiB); "
          f"API peak memory grew by {(peak_rss(pid) - before) / MIB:.1f} MiB")
    assert sent < 8 * MIB, sent  # it stopped the stream soon after the limit, not at the end
    assert peak_rss(pid) - before < 20 * MIB
    assert httpx.get(f"{url}/healthz").status_code == 200  # and serves the next request


def test_uploads_are_capped_per_purpose_and_stream_to_storage(small_api, stack_env):
    url, _ = small_api
    with httpx.Client(base_url=url, headers=AUTH, timeout=30) as client:
        big_image = png(250, 250, noise=True)
        assert IMAGE_LIMIT < len(big_image) < ITEMS_FILE_LIMIT
        refused = client.post("/v1/files", data={"purpose": "image"}, files={"file": ("a.png", big_image)})
        assert refused.status_code == 413, refused.text
        assert "HSCR_MAX_IMAGE_BYTES" in refused.text and str(IMAGE_LIMIT) in refused.text
        line = b'{"image": "file-x", "question": "q"}\n'
        items = line * (ITEMS_FILE_LIMIT // len(line) + 100)  # over the items limit, under the body cap
        refused = client.post("/v1/files", data={"purpose": "items"}, files={"file": ("i.jsonl", items)})
        assert refused.status_code == 413 and "HSCR_MAX_ITEMS_FILE_BYTES" in refused.text, refused.text
        whole = client.post("/v1/files", data={"purpose": "items"}, files={"file": ("i.jsonl", items * 4)})
        assert whole.status_code == 413, whole.text  # over the body cap: refused before the form is parsed
        assert "HSCR_MAX_ITEMS_FILE_BYTES or HSCR_MAX_IMAGE_BYTES" in whole.json()["error"]["message"]

        image = png(120, 90, noise=True)  # under the limit: stored byte for byte
        stored = client.post("/v1/files", data={"purpose": "image"}, files={"file": ("b.png", image)})
        assert stored.status_code == 201, stored.text
        record = stored.json()
        assert record["bytes"] == len(image) and record["sha256"] == hashlib.sha256(image).hexdigest()
        from hscr_client.storage import open_location

        location = open_location(stack_env["env"]["HSCR_STORAGE_URI"])
        assert location.read_bytes(f"files/alice/{record['id']}") == image


def test_too_many_inline_items_names_the_setting(alice):
    many = [{"image": "data:image/png;base64,AA==", "question": "q"}] * 201  # HSCR_MAX_ITEMS_PER_JOB=200
    response = alice.post("/v1/jobs", json={"items": many})
    assert response.status_code == 413
    assert "limit is 200" in response.text and "HSCR_MAX_ITEMS_PER_JOB" in response.text


# --- images at upload (item 8) -------------------------------------------------------------------------------

def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` and holds no pixel data: what a bomb's header says."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IEND", b""))


def test_upload_messages_cite_our_pixel_limit_and_accept_dicom_without_preamble(alice):
    from pydicom.data import get_testdata_file

    bomb = alice.post("/v1/files", data={"purpose": "image"}, files={"file": ("b.png", png_header(20_000, 20_000))})
    assert bomb.status_code == 422, bomb.text
    message = bomb.json()["error"]["message"]
    assert "400000000 pixels" in message and "the limit is 40000000 (HSCR_MAX_IMAGE_PIXELS" in message, message
    assert "178956970" not in message  # Pillow's own limit, which fires first for an image this large
    dicom = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    headerless = alice.post("/v1/files", data={"purpose": "image"}, files={"file": ("ct.dcm", dicom[132:])})
    assert headerless.status_code == 201, headerless.text
    assert headerless.json()["content_type"] == "application/dicom"
    junk = alice.post("/v1/files", data={"purpose": "image"}, files={"file": ("x.dcm", b"\x00" * 300)})
    assert junk.status_code == 422 and "not a readable image" in junk.text  # force-parses, but holds no image


# --- hostile ids --------------------------------------------------------------------------------------------

HOSTILE_IDS = ["a:b", "job-1:chunks", "x" * 257, "a b", "über", "a%3Ab", "tab\there", "q?x=1", "semi;colon"]
JOB_ROUTES = [("GET", "/v1/jobs/{}"), ("POST", "/v1/jobs/{}/cancel"), ("GET", "/v1/jobs/{}/dataset"),
              ("GET", "/v1/jobs/{}/errors"), ("GET", "/v1/jobs/{}/events"), ("GET", "/v1/jobs/{}/viewer"),
              ("GET", "/v1/jobs/{}/viewer/summary"), ("GET", "/v1/jobs/{}/viewer/rows"), ("GET", "/v1/files/{}")]


def test_hostile_ids_get_a_4xx_naming_the_rule_on_a_connection_that_stays_open(api):
    address = urlparse(api)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    connection.connect()
    first_socket = connection.sock
    answers = []
    for hostile in HOSTILE_IDS:
        for method, route in JOB_ROUTES:
            path = route.format(quote(hostile, safe=":;"))
            connection.request(method, path, headers=AUTH)
            response = connection.getresponse()
            body = response.read()
            answers.append((method, path, response.status))
            assert response.status == 422, (method, path, response.status, body[:300])
            error = json.loads(body)["error"]
            assert ID_RULE in error["message"], error
            assert error["request_id"] == response.getheader("X-Request-ID")
            assert not response.will_close, (method, path)
    for path, headers in [("/v1/jobs?after=a:b", AUTH), ("/v1/files?after=" + "x" * 300, AUTH),
                          ("/v1/jobs/job-1/events", {**AUTH, "Last-Event-ID": "0-0:x"})]:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        assert response.status == 422, (path, response.read()[:300])
        response.read()
    connection.request("POST", "/v1/jobs", body=json.dumps({"items": [{"image": "data:,", "question": "q"}]}),
                       headers={**AUTH, "Content-Type": "application/json", "Idempotency-Key": "k:1"})
    response = connection.getresponse()
    assert response.status == 422 and b"Idempotency-Key" in response.read()
    assert connection.sock is first_socket  # one keep-alive connection served every answer
    connection.close()


def test_hostile_custom_ids_and_file_ids_in_items(alice, stack_env):
    inline = alice.post("/v1/jobs", json={"items": [{"custom_id": "a:b", "image": "data:,", "question": "q"}]})
    assert inline.status_code == 422 and ID_RULE in inline.json()["error"]["message"], inline.text
    by_file = alice.post("/v1/jobs", json={"input_file_id": "file-1:x"})
    assert by_file.status_code == 422 and "input_file_id" in by_file.text

    from hscr_jobs.store import Store, connect
    from hscr_service.core.config import Settings
    from hscr_service.core.jobs import normalize

    store = Store(connect(stack_env["env"]["HSCR_REDIS_URL"]))
    rows = normalize([{"custom_id": "x", "image": "file-1:chunks", "question": "q"},
                      {"custom_id": "y", "image": "file-" + "f" * 300, "question": "q"}],
                     tenant="alice", store=store, settings=Settings())
    assert [row["custom_id"] for row in rows] == ["x", "y"]
    assert all("image file id" in row["error"] and ID_RULE in row["error"] for row in rows), rows


def test_corrupt_job_state_is_a_json_500_with_a_request_id(api, stack_env):
    """Anything unexpected (here: a job record that is not JSON, as a damaged or foreign writer could leave)
    answers a JSON 500 naming the request id, and the connection stays usable."""
    from hscr_jobs.store import Store, connect

    store = Store(connect(stack_env["env"]["HSCR_REDIS_URL"]))
    job_id = "job-corrupt-" + uuid.uuid4().hex
    store.redis.hset(store.job_key("alice", job_id), mapping={"doc": "{not json", "status": "in_progress"})
    address = urlparse(api)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    for given_id, echoed in [("trace-123", True), ("bad id:with space", False)]:
        connection.request("GET", f"/v1/jobs/{job_id}", headers={**AUTH, "X-Request-ID": given_id})
        response = connection.getresponse()
        body = response.read()
        assert response.status == 500, body
        assert response.getheader("Content-Type") == "application/json"
        error = json.loads(body)["error"]
        request_id = response.getheader("X-Request-ID")
        assert error["code"] == "internal_error" and error["request_id"] == request_id
        assert request_id in error["message"]
        assert (request_id == given_id) is echoed  # a client's id is kept only when it follows the id rule
        assert not response.will_close
    connection.request("GET", "/healthz")
    assert connection.getresponse().status == 200
    connection.close()
    store.redis.delete(store.job_key("alice", job_id))


# --- Redis down during reads --------------------------------------------------------------------------------

def test_reads_answer_503_at_once_while_redis_is_down_and_recover(stack_env, tmp_path):
    private = RedisServer(tmp_path)
    private.start()
    process, url = start_api(stack_env, "redis-down-api", HSCR_REDIS_URL=private.url, HSCR_QUEUE="hscr-redis-down")
    try:
        with httpx.Client(base_url=url, headers=AUTH, timeout=30) as client:
            image = "data:image/png;base64," + base64.b64encode(png(8, 8)).decode()
            job = client.post("/v1/jobs", json={"items": [{"image": image, "question": "q"}]}).json()
            upload = client.post("/v1/files", data={"purpose": "image"}, files={"file": ("a.png", png(8, 8))}).json()
            reads = [f"/v1/jobs/{job['id']}", "/v1/jobs", "/v1/files", f"/v1/files/{upload['id']}",
                     f"/v1/jobs/{job['id']}/dataset", f"/v1/jobs/{job['id']}/errors",
                     f"/v1/jobs/{job['id']}/viewer/summary", f"/v1/jobs/{job['id']}/events"]
            assert all(client.get(path).status_code == 200 for path in reads[:-1])

            private.stop()
            slowest = 0.0
            for path in reads:
                started = time.monotonic()
                response = client.get(path)
                slowest = max(slowest, time.monotonic() - started)
                assert response.status_code == 503, (path, response.status_code, response.text[:300])
                assert response.headers["Retry-After"] == "5", path
                assert "Redis" in response.json()["error"]["message"], path
            started = time.monotonic()
            created = client.post("/v1/jobs", json={"items": [{"image": image, "question": "q"}]})
            assert created.status_code == 503 and created.headers["Retry-After"], created.text
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.headers["Retry-After"] == "5"
            assert ready.json()["checks"]["redis"].startswith("unreachable")
            metrics = client.get("/metrics")  # the scrape still answers, without the queue series
            assert metrics.status_code == 200 and "hscr_queue_chunks" not in metrics.text
            slowest = max(slowest, (time.monotonic() - started) / 4)
            print(f"\nslowest answer with Redis down: {slowest:.2f} s")
            assert slowest < 5, slowest  # bounded, never the ~35 s of a client riding out a restart

            private.start()  # same port, same AOF: the job and the file are back
            wait_until(lambda: client.get("/readyz").status_code == 200, 15, "readiness after Redis returned")
            assert client.get(f"/v1/jobs/{job['id']}").json()["id"] == job["id"]
            assert client.get(f"/v1/files/{upload['id']}").status_code == 200
    finally:
        stop(process)
        private.stop()


# --- the served spec ----------------------------------------------------------------------------------------

def test_every_ref_in_the_served_spec_resolves(api):
    """The events route once embedded Event's own schema, whose '#/$defs/RequestCounts' pointed nowhere."""
    spec = httpx.get(f"{api}/openapi.json").json()

    def refs(node):
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                yield node["$ref"]
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    found = set(refs(spec))
    assert "#/components/schemas/Event" in found
    for ref in found:
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.rsplit("/", 1)[1] in spec["components"]["schemas"], ref
