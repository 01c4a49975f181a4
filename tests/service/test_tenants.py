"""Tenant isolation on every endpoint: another tenant's ids answer 404 (never 403), lists never leak."""

from __future__ import annotations

import httpx
from service_helpers import inline_items


def test_other_tenants_see_nothing(alice, bob, api, fixture_items):
    image = alice.post("/v1/files", data={"purpose": "image"},
                       files={"file": ("a.png", (fixture_items / "img" / "fx-77-00000.png").read_bytes())}).json()
    job = alice.post("/v1/jobs", json={"items": inline_items(fixture_items, 1, prefix="tenant-")}).json()
    assert alice.get(f"/v1/jobs/{job['id']}").status_code == 200
    assert alice.get(f"/v1/files/{image['id']}").status_code == 200

    for method, path in [("GET", f"/v1/files/{image['id']}"), ("GET", f"/v1/jobs/{job['id']}"),
                         ("POST", f"/v1/jobs/{job['id']}/cancel"), ("GET", f"/v1/jobs/{job['id']}/events"),
                         ("GET", f"/v1/jobs/{job['id']}/dataset"), ("GET", f"/v1/jobs/{job['id']}/errors")]:
        theirs = bob.request(method, path)
        missing = bob.request(method, path.replace(job["id"], "job-nope").replace(image["id"], "file-nope"))
        assert theirs.status_code == missing.status_code == 404, (method, path, theirs.status_code)
        assert theirs.json()["error"]["code"] == "not_found"
    assert job["id"] not in [j["id"] for j in bob.get("/v1/jobs", params={"limit": 100}).json()["data"]]
    assert image["id"] not in [f["id"] for f in bob.get("/v1/files", params={"limit": 100}).json()["data"]]
    assert bob.post("/v1/jobs", json={"input_file_id": image["id"]}).status_code == 404
    # Bob cannot cancel alice's job, and alice's job is untouched by the attempt.
    assert alice.get(f"/v1/jobs/{job['id']}").json()["status"] != "cancelling"
    alice.post(f"/v1/jobs/{job['id']}/cancel")

    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}):
        response = httpx.get(f"{api}/v1/jobs", headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"
    assert httpx.get(f"{api}/healthz").status_code == 200
    assert httpx.get(f"{api}/readyz").json()["checks"] == {"redis": "ok", "storage": "ok"}
    assert "hscr_queue_chunks" in httpx.get(f"{api}/metrics").text
