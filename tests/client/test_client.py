"""The synchronous client over httpx.MockTransport. ``test_async_client.py`` is its twin, test for test."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest
from sdk_wire import (
    API_KEY,
    BASE_URL,
    BrokenStream,
    Recorder,
    dataset_json,
    error_json,
    event_json,
    file_json,
    job_json,
    make_client,
    sha256,
    sse,
)

import hscr_client
from hscr_client import (
    NOT_GIVEN,
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    Client,
    ConflictError,
    HSCRError,
    HSCRParams,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    UnprocessableEntityError,
    WaitTimeoutError,
)

STATUS_ERRORS = [(400, BadRequestError), (401, AuthenticationError), (403, PermissionDeniedError),
                 (404, NotFoundError), (409, ConflictError), (422, UnprocessableEntityError),
                 (429, RateLimitError), (500, InternalServerError), (503, InternalServerError),
                 (418, APIStatusError)]


# --- configuration and request building ----------------------------------------------------------

def test_key_and_url_come_from_arguments_or_environment(monkeypatch):
    monkeypatch.setenv("HSCR_API_KEY", "sk-from-env")
    monkeypatch.setenv("HSCR_BASE_URL", "http://env.test:9000/")
    recorder = Recorder(httpx.Response(200, json=job_json()))
    client = Client(http_client=httpx.Client(transport=httpx.MockTransport(recorder)))
    client.jobs.retrieve("job-1")
    assert recorder.requests[0].url == "http://env.test:9000/v1/jobs/job-1"
    assert recorder.requests[0].headers["authorization"] == "Bearer sk-from-env"

    explicit = make_client(recorder, api_key="sk-arg")
    explicit.jobs.retrieve("job-1")
    assert recorder.requests[1].headers["authorization"] == "Bearer sk-arg"
    assert recorder.requests[1].url == f"{BASE_URL}/v1/jobs/job-1"
    assert recorder.requests[1].headers["user-agent"].startswith("hscr-client/")


def test_repr_never_shows_the_key():
    client = make_client(Recorder(httpx.Response(200)))
    assert API_KEY not in repr(client) and BASE_URL in repr(client)


def test_ids_are_one_escaped_path_segment():
    recorder = Recorder(httpx.Response(200, json=job_json()))
    make_client(recorder).jobs.retrieve("../files/x")
    assert recorder.requests[0].url.raw_path == b"/v1/jobs/..%2Ffiles%2Fx"
    with pytest.raises(ValueError, match="job_id"):
        make_client(recorder).jobs.retrieve("")


def test_create_sends_only_given_fields_and_an_idempotency_key():
    recorder = Recorder(httpx.Response(201, json=job_json()))
    job = make_client(recorder).jobs.create(input_file_id="file-1", params=HSCRParams(n_levels=2),
                                            metadata={"run": "a"}, model=NOT_GIVEN)
    assert job.id == "job-1" and job.status == "validating"
    request = recorder.requests[0]
    body = json.loads(request.content)
    assert set(body) == {"input_file_id", "params", "metadata"}
    assert body["params"]["n_levels"] == 2 and body["metadata"] == {"run": "a"}
    key = request.headers["idempotency-key"]
    assert uuid.UUID(key.removeprefix("hscr-"))


def test_each_create_call_gets_its_own_key_unless_given():
    recorder = Recorder(httpx.Response(201, json=job_json()))
    client = make_client(recorder)
    client.jobs.create(items=[{"image": "file-9", "question": "Where?"}])
    client.jobs.create(items=[{"image": "file-9", "question": "Where?"}])
    client.jobs.create(input_file_id="file-1", idempotency_key="my-key")
    keys = [request.headers["idempotency-key"] for request in recorder.requests]
    assert keys[0] != keys[1] and keys[2] == "my-key"
    assert json.loads(recorder.requests[0].content)["items"] == [{"image": "file-9", "question": "Where?"}]


def test_list_and_cancel_build_their_routes():
    page = {"object": "list", "data": [job_json("job-2"), job_json("job-1")], "last_id": "job-1", "has_more": True}
    recorder = Recorder(httpx.Response(200, json=page), httpx.Response(200, json=job_json(status="cancelling")))
    client = make_client(recorder)
    listed = client.jobs.list(limit=2, after="job-3")
    assert [job.id for job in listed.data] == ["job-2", "job-1"] and listed.has_more
    assert recorder.requests[0].url.params == httpx.QueryParams({"limit": "2", "after": "job-3"})
    assert client.jobs.cancel("job-1").status == "cancelling"
    assert (recorder.requests[1].method, recorder.requests[1].url.path) == ("POST", "/v1/jobs/job-1/cancel")


def test_item_errors_are_parsed_from_ndjson():
    body = b'{"custom_id": "a", "error": "image is not a PNG"}\n\n{"custom_id": "b", "error": "empty question"}\n'
    recorder = Recorder(httpx.Response(200, content=body, headers={"content-type": "application/x-ndjson"}))
    errors = make_client(recorder).jobs.errors("job-1")
    assert [error["custom_id"] for error in errors] == ["a", "b"]


# --- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("status", "error_class"), STATUS_ERRORS)
def test_each_status_maps_to_its_error_class(status, error_class):
    reply = httpx.Response(status, json=error_json("some_code", "what went wrong", "params.n_levels"),
                           headers={"x-request-id": "req-42", "x-should-retry": "false"})
    with pytest.raises(error_class) as caught:
        make_client(Recorder(reply)).jobs.retrieve("job-1")
    error = caught.value
    assert type(error) is error_class
    assert isinstance(error, APIStatusError) and isinstance(error, HSCRError)
    assert (error.status_code, error.request_id, error.code, error.param) == (
        status, "req-42", "some_code", "params.n_levels")
    assert error.message == "what went wrong" and "req-42" in str(error)


def test_fastapi_validation_errors_read_as_one_message():
    detail = {"detail": [{"loc": ["body", "params", "n_levels"], "msg": "Input should be less than 17"}]}
    with pytest.raises(UnprocessableEntityError, match="params.n_levels: Input should be less than 17"):
        make_client(Recorder(httpx.Response(422, json=detail))).jobs.create(input_file_id="f")


def test_a_non_json_error_body_still_gives_a_message():
    with pytest.raises(InternalServerError, match="upstream exploded"):
        client = make_client(Recorder(httpx.Response(500, text="upstream exploded")), max_retries=0)
        client.jobs.retrieve("j")


def test_timeouts_and_refusals_become_connection_errors():
    timeout = Recorder(httpx.ReadTimeout("slow"))
    with pytest.raises(APITimeoutError):
        make_client(timeout, max_retries=0).jobs.retrieve("job-1")
    refused = Recorder(httpx.ConnectError("refused"))
    with pytest.raises(APIConnectionError) as caught:
        make_client(refused, max_retries=0).jobs.retrieve("job-1")
    assert not isinstance(caught.value, APITimeoutError) and isinstance(caught.value.__cause__, httpx.ConnectError)


# --- retries and idempotency -----------------------------------------------------------------------

def test_create_retries_5xx_and_connection_errors_with_one_idempotency_key():
    recorder = Recorder(httpx.Response(503, json=error_json("unavailable", "restarting")),
                        httpx.ConnectError("reset"),
                        httpx.Response(201, json=job_json()))
    job = make_client(recorder, max_retries=2).jobs.create(input_file_id="file-1")
    assert job.id == "job-1" and len(recorder.requests) == 3
    assert len({request.headers["idempotency-key"] for request in recorder.requests}) == 1
    assert len({request.content for request in recorder.requests}) == 1


def test_retries_stop_at_max_retries():
    recorder = Recorder(httpx.Response(502, text="bad gateway"))
    with pytest.raises(InternalServerError):
        make_client(recorder, max_retries=3).jobs.retrieve("job-1")
    assert len(recorder.requests) == 4


def test_client_errors_are_not_retried():
    recorder = Recorder(httpx.Response(404, json=error_json("not_found", "no job job-1")))
    with pytest.raises(NotFoundError):
        make_client(recorder, max_retries=3).jobs.retrieve("job-1")
    assert len(recorder.requests) == 1


def test_rate_limits_are_retried_and_the_server_can_forbid_a_retry():
    limited = Recorder(httpx.Response(429, headers={"retry-after": "0"}), httpx.Response(200, json=job_json()))
    assert make_client(limited).jobs.retrieve("job-1").id == "job-1"
    assert len(limited.requests) == 2
    refused = Recorder(httpx.Response(503, headers={"x-should-retry": "false"}))
    with pytest.raises(InternalServerError):
        make_client(refused, max_retries=3).jobs.retrieve("job-1")
    assert len(refused.requests) == 1


def test_per_call_options_override_the_client():
    recorder = Recorder(httpx.Response(500))
    with pytest.raises(InternalServerError):
        make_client(recorder, max_retries=0).jobs.retrieve("job-1")
    assert len(recorder.requests) == 1
    seen = Recorder(lambda request: httpx.Response(200, json=job_json(), headers={
        "x-timeout": json.dumps(request.extensions["timeout"])}))
    make_client(seen).jobs.retrieve("job-1", timeout=3.0)
    assert seen.requests[0].extensions["timeout"]["read"] == 3.0


def test_retry_delay_doubles_and_is_capped():
    client = make_client(Recorder(httpx.Response(200)), retry_backoff=1.0)
    delays = [client._retry_delay(attempt, None) for attempt in range(6)]
    assert 0.75 <= delays[0] <= 1.0 and 1.5 <= delays[1] <= 2.0 and 3.0 <= delays[2] <= 4.0
    assert max(delays) <= 8.0
    assert client._retry_delay(0, httpx.Response(429, headers={"retry-after": "2"})) == 2.0


# --- files -----------------------------------------------------------------------------------------

def test_upload_sends_multipart_with_purpose_and_type(tmp_path):
    image = tmp_path / "scan.dcm"
    image.write_bytes(b"DICM-bytes")
    recorder = Recorder(httpx.Response(201, json=file_json("file-7", "scan.dcm", "image")))
    uploaded = make_client(recorder).files.upload(image, purpose="image")
    assert uploaded.id == "file-7"
    request = recorder.requests[0]
    assert request.headers["content-type"].startswith("multipart/form-data")
    assert b'name="purpose"\r\n\r\nimage' in request.content
    assert b'filename="scan.dcm"' in request.content and b"application/dicom" in request.content
    assert b"DICM-bytes" in request.content


def test_upload_items_uploads_each_local_image_once_and_rewrites_references(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"PNG-a")
    lines = [
        {"custom_id": "1", "image": "img/a.png", "question": "q1"},
        {"custom_id": "2", "image": "img/a.png", "question": "q2"},  # same image: uploaded once
        {"custom_id": "3", "image": "file-already", "question": "q3"},
        {"custom_id": "4", "image": "img/missing.png", "question": "q4"},  # left for the service to reject
    ]
    items = tmp_path / "items.jsonl"
    items.write_text("\n".join(json.dumps(line) for line in lines) + "\nnot json at all\n")
    recorder = Recorder(httpx.Response(201, json=file_json("file-img", "a.png", "image")),
                        httpx.Response(201, json=file_json("file-items")))
    uploaded = make_client(recorder).files.upload_items(items)
    assert uploaded.id == "file-items" and len(recorder.requests) == 2
    assert b"PNG-a" in recorder.requests[0].content
    sent = recorder.requests[1].content.decode()
    body = sent.split("\r\n\r\n", 2)[-1]
    assert [json.loads(line)["image"] for line in body.splitlines()[:4]] == [
        "file-img", "file-img", "file-already", "img/missing.png"]
    assert "not json at all" in body  # kept: the service reports it as that line's error


def test_files_retrieve_and_list():
    page = {"object": "list", "data": [file_json()], "has_more": False}
    recorder = Recorder(httpx.Response(200, json=file_json()), httpx.Response(200, json=page))
    client = make_client(recorder)
    assert client.files.retrieve("file-1").filename == "items.jsonl"
    assert client.files.list(limit=5).data[0].id == "file-1"
    assert recorder.requests[1].url.params["limit"] == "5"


# --- waiting and events ----------------------------------------------------------------------------

def test_wait_polls_until_terminal_and_draws_progress(capsys):
    counts = {"total": 4, "completed": 2, "failed": 0}
    recorder = Recorder(httpx.Response(200, json=job_json(status="validating")),
                        httpx.Response(200, json=job_json(status="in_progress", request_counts=counts)),
                        httpx.Response(200, json=job_json(status="completed",
                                                          request_counts={**counts, "completed": 3, "failed": 1})))
    job = make_client(recorder).jobs.wait("job-1", progress=True, poll_interval=0)
    assert job.status == "completed" and len(recorder.requests) == 3
    assert "4/4" in capsys.readouterr().err


def test_wait_gives_up_after_its_timeout():
    recorder = Recorder(httpx.Response(200, json=job_json(status="in_progress")))
    with pytest.raises(WaitTimeoutError) as caught:
        make_client(recorder).jobs.wait("job-1", poll_interval=0.01, timeout=0.05)
    assert caught.value.job.status == "in_progress" and isinstance(caught.value, HSCRError)


def test_iter_events_resumes_after_a_dropped_connection_without_loss():
    first = sse(event_json("1", completed=0), event_json("2", completed=2))
    recorder = Recorder(
        httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=BrokenStream(first)),
        httpx.Response(200, headers={"content-type": "text/event-stream"},
                       content=sse(event_json("3", completed=4), event_json("4", "completed", 4, kind="job.status"))),
    )
    events = list(make_client(recorder).jobs.iter_events("job-1"))
    assert [event.id for event in events] == ["1", "2", "3", "4"]
    assert events[-1].status == "completed"
    assert "last-event-id" not in recorder.requests[0].headers
    assert recorder.requests[1].headers["last-event-id"] == "2"
    assert recorder.requests[0].headers["accept"] == "text/event-stream"


def test_iter_events_gives_up_after_max_reconnects():
    recorder = Recorder(httpx.Response(200, headers={"content-type": "text/event-stream"}, content=b": ping\n\n"))
    with pytest.raises(APIConnectionError, match="broke"):
        list(make_client(recorder).jobs.iter_events("job-1", max_reconnects=2))
    assert len(recorder.requests) == 3


# --- datasets --------------------------------------------------------------------------------------

def test_download_fetches_presigned_urls_without_the_key_and_checks_sha256(tmp_path):
    shard = b"parquet-bytes"
    info = dataset_json([{"config": "pairs", "chunk": 0, "path": "pairs/part-00000.parquet", "rows": 3,
                           "sha256": sha256(shard), "bytes": len(shard),
                           "url": "https://s3.test/bucket/datasets/job-1/pairs/part-00000.parquet?X-Amz-Signature=s"}],
                         manifest_url=f"{BASE_URL}/v1/jobs/job-1/dataset/manifest.json")

    def serve(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/jobs/job-1/dataset":
            return httpx.Response(200, json=info)
        if request.url.host == "s3.test":
            return httpx.Response(200, content=shard)
        return httpx.Response(200, json={"shards": 1})

    recorder = Recorder(serve)
    client = make_client(recorder)
    result = client.datasets.download("job-1", tmp_path / "out")
    assert not result.complete
    assert (tmp_path / "out" / "pairs" / "part-00000.parquet").read_bytes() == shard
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == {"shards": 1}
    by_host = {request.url.host: request for request in recorder.requests}
    assert "authorization" not in by_host["s3.test"].headers  # a presigned URL never sees the key
    assert by_host["hscr.test"].headers["authorization"] == f"Bearer {API_KEY}"

    # Re-running skips the shard already there with the right sha256.
    seen = len(recorder.requests)
    client.datasets.download("job-1", tmp_path / "out")
    assert [r.url.host for r in recorder.requests[seen:]] == ["hscr.test", "hscr.test"]


def test_download_refuses_a_shard_whose_sha256_differs(tmp_path):
    info = dataset_json([{"config": "pairs", "chunk": 0, "path": "pairs/part-00000.parquet", "rows": 1,
                           "sha256": sha256(b"expected"), "bytes": 8, "url": "https://s3.test/x"}])
    recorder = Recorder(httpx.Response(200, json=info), httpx.Response(200, content=b"tampered"))
    with pytest.raises(HSCRError, match="sha256"):
        make_client(recorder).datasets.download("job-1", tmp_path)
    assert list(tmp_path.rglob("*.parquet")) == [] and list(tmp_path.rglob(".part-*")) == []


def test_download_refuses_paths_outside_the_directory(tmp_path):
    info = dataset_json([{"config": "pairs", "chunk": 0, "path": "../../escape.parquet", "rows": 1,
                           "sha256": "0", "bytes": 1, "url": "https://s3.test/x"}])
    with pytest.raises(HSCRError, match="leaves"):
        make_client(Recorder(httpx.Response(200, json=info))).datasets.download("job-1", tmp_path / "out")


def test_load_opens_a_config_as_a_datasets_dataset(tmp_path):
    from dataset_files import pairs_parquet

    shard = pairs_parquet(tmp_path / "store" / "pairs" / "part-00000.parquet")
    ranked = tmp_path / "store" / "ranked.parquet"
    ranked.write_bytes(b"not used")
    info = dataset_json([
        {"config": "pairs", "chunk": 0, "path": "pairs/part-00000.parquet", "rows": 2,
         "sha256": sha256(shard.read_bytes()), "bytes": shard.stat().st_size, "url": shard.as_uri()},
        {"config": "ranked", "chunk": 0, "path": "ranked/part-00000.parquet", "rows": 1,
         "sha256": sha256(b"not used"), "bytes": 8, "url": ranked.as_uri()},
    ], status="completed", complete=True)
    dataset = make_client(Recorder(httpx.Response(200, json=info))).datasets.load("job-1", config="pairs")
    assert dataset.num_rows == 2 and dataset[0]["custom_id"] == "a"
    assert dataset.features == hscr_client.schema.features("pairs")
    assert not list((tmp_path / "cache").rglob("ranked/*.parquet"))  # only the asked config is fetched


def test_job_summary_counts_every_item():
    from hscr_client._cli import _summary

    counts = {"total": 10, "completed": 4, "failed": 1, "cancelled": 5, "expired": 0}
    job = hscr_client.Job.model_validate(job_json(status="cancelled", request_counts=counts))
    assert job.request_counts.cancelled == 5
    assert "4/10 done, 1 failed, 5 cancelled" in _summary(job) and "expired" not in _summary(job)


@pytest.mark.parametrize(("field", "value"), [("severity_order", 0), ("severity_order", "yes"),
                                              ("min_similarity_gap", False), ("n_levels", "3"), ("n_levels", 2.5),
                                              ("dropout_ratio", "0.5")])
def test_params_refuse_a_value_of_the_wrong_json_type(field, value):
    # The API must refuse what the schema refuses (schemathesis found 0 and false accepted, coerced).
    with pytest.raises(ValueError, match=field):
        HSCRParams.model_validate({field: value})


def test_params_take_their_own_types_and_an_integer_for_a_number():
    params = HSCRParams.model_validate({"severity_order": False, "min_similarity_gap": 0, "dropout_ratio": 1,
                                        "dropout_mode": "zero", "n_levels": 2.0})  # 2.0: an integer in JSON Schema
    assert params.severity_order is False and params.min_similarity_gap == 0.0 and params.n_levels == 2
