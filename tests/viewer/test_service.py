"""The viewer served by the API for a job: auth and tenant rules, paging JSON, and the page in Chromium."""

from __future__ import annotations

import shutil
import threading
import time
import uuid

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from hscr_client.viewer import Filters, ViewerDataset

service_main = pytest.importorskip("hscr_service.main", reason="the service app (hscr_service) is not installed")
from hscr_jobs.store import JobRecord  # noqa: E402
from hscr_service.core.config import Settings  # noqa: E402
from hscr_service.core.security import hash_key  # noqa: E402

KEY_A, KEY_B = "hscr-viewer-test-key-a", "hscr-viewer-test-key-b"


@pytest.fixture(scope="module")
def app_and_job(redis_url, fixture_dataset, tmp_path_factory):
    """The real app (private Redis, local storage) with one finished job of tenant ``a``."""
    storage_root = tmp_path_factory.mktemp("service-storage")
    settings = Settings(redis_url=redis_url, storage_uri=str(storage_root),
                        api_keys=[f"a:{hash_key(KEY_A)}", f"b:{hash_key(KEY_B)}"])
    app = service_main.create_app(settings)
    job_id = f"job_{uuid.uuid4().hex[:12]}"
    dataset_uri = app.state.storage.dataset_uri(job_id)
    shutil.copytree(fixture_dataset, dataset_uri)
    app.state.store.create_job(JobRecord(
        id=job_id, tenant="a", model="fixture", params={}, created_at=int(time.time()), total=40, n_chunks=2,
        chunk_size=32, input_uri=app.state.storage.input_uri(job_id), dataset_uri=dataset_uri), status="completed")
    return app, job_id


@pytest.fixture(scope="module")
def client(app_and_job):
    from fastapi.testclient import TestClient

    with TestClient(app_and_job[0]) as test_client:
        yield test_client


def body_attr(driver, name: str) -> str | None:
    return driver.find_element(By.TAG_NAME, "body").get_attribute(name)


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_rows_and_summary_follow_auth_and_tenant_rules(client, app_and_job, fixture_dataset):
    _, job_id = app_and_job
    dataset = ViewerDataset.open(str(fixture_dataset))
    base = f"/v1/jobs/{job_id}/viewer"

    page = client.get(f"{base}/rows", params={"limit": 5, "offset": 5, "level": 2}, headers=auth(KEY_A))
    assert page.status_code == 200, page.text
    body = page.json()
    expected = dataset.select(Filters(level=2))
    assert body["total"] == len(expected)
    assert [item["id"] for item in body["items"]] == [r["id"] for r in expected[5:10]]
    assert all(item["image"] for item in body["items"])
    errors = client.get(f"{base}/rows", params={"status": "errors", "limit": 200}, headers=auth(KEY_A)).json()
    assert [e["id"] for e in errors["items"]] == [e["id"] for e in dataset.errors]
    summary = client.get(f"{base}/summary", headers=auth(KEY_A)).json()
    assert (summary["rows"], summary["errors"]) == (len(dataset.rows), len(dataset.errors))

    for path in (f"{base}/rows", f"{base}/summary", base):
        assert client.get(path, headers=auth(KEY_B)).status_code == 404  # another tenant: not found, not forbidden
        assert client.get(path).status_code == 401
        assert client.get(path, headers=auth("not-a-key")).status_code == 401
    assert client.get("/v1/jobs/job_missing/viewer/rows", headers=auth(KEY_A)).status_code == 404
    assert client.get(f"{base}/rows", params={"limit": 0}, headers=auth(KEY_A)).status_code == 422
    assert client.get(f"{base}/rows", params={"modality": "Sonar"}, headers=auth(KEY_A)).status_code == 422
    assert client.get(f"{base}/rows", params={"status": "x"}, headers=auth(KEY_A)).status_code == 422


def test_page_with_a_key_embeds_the_summary_and_a_bare_navigation_reveals_nothing(client, app_and_job):
    _, job_id = app_and_job
    page = client.get(f"/v1/jobs/{job_id}/viewer", headers=auth(KEY_A))
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '"rows":' in page.text and "default-src 'none'" in page.headers["content-security-policy"]
    navigation = {"Accept": "text/html,application/xhtml+xml"}
    shell = client.get(f"/v1/jobs/{job_id}/viewer", headers=navigation)
    other = client.get("/v1/jobs/job_does_not_exist/viewer", headers=navigation)
    assert shell.status_code == other.status_code == 200
    assert '"summary":null' in shell.text
    assert shell.text.replace(job_id, "X") == other.text.replace("job_does_not_exist", "X")  # same page for any id


@pytest.fixture(scope="module")
def served(app_and_job):
    """The app under uvicorn on a loopback port, for the browser."""
    import socket

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app_and_job[0], host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_the_served_page_asks_for_a_key_then_pages_through_the_api(browser, served, app_and_job, fixture_dataset,
                                                                   shots_dir):
    _, job_id = app_and_job
    dataset = ViewerDataset.open(str(fixture_dataset))
    browser.get("about:blank")
    browser.get(f"{served}/v1/jobs/{job_id}/viewer#size=10")
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "keyform").is_displayed())
    key = browser.find_element(By.ID, "apikey")
    key.send_keys(KEY_B + "\n")  # another tenant's key: the data requests answer 404
    WebDriverWait(browser, 30).until(lambda d: "not_found" in d.page_source or "no job" in d.page_source)
    browser.execute_script("sessionStorage.clear()")
    browser.get(f"{served}/v1/jobs/{job_id}/viewer#size=10")
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "keyform").is_displayed())
    browser.find_element(By.ID, "apikey").send_keys(KEY_A + "\n")
    WebDriverWait(browser, 30).until(lambda d: body_attr(d, "data-state") == "ready")

    def ids():
        return [e.get_attribute("data-id") for e in browser.find_elements(By.CSS_SELECTOR, "article.item")]

    assert ids() == [r["id"] for r in dataset.rows[:10]]
    mark = browser.find_element(By.CSS_SELECTOR, "article.item mark.rep")
    row = dataset.rows[0]
    first_mark = row["levels"][0]["marks"][0]
    assert (mark.text, mark.get_attribute("data-original")) == (first_mark["replacement"], first_mark["original"])
    browser.save_screenshot(str(shots_dir / "viewer-api.png"))

    before = body_attr(browser, "data-render")
    browser.find_element(By.ID, "next").click()
    WebDriverWait(browser, 30).until(lambda d: body_attr(d, "data-render") != before)
    assert ids() == [r["id"] for r in dataset.rows[10:20]]

    before = body_attr(browser, "data-render")
    Select(browser.find_element(By.ID, "level")).select_by_value("3")
    WebDriverWait(browser, 30).until(lambda d: body_attr(d, "data-render") != before)
    assert ids() == [r["id"] for r in dataset.select(Filters(level=3))[:10]]
    assert httpx.get(f"{served}/v1/jobs/{job_id}/viewer/rows").status_code == 401
