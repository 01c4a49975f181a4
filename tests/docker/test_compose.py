"""docker/ checked as far as a machine without a Docker engine allows.

- The compose files validate against the Compose Specification's JSON schema. ``compose_spec.json``
  is vendored verbatim from the ``docker-compose==1.29.2`` wheel on PyPI
  (``compose/config/compose_spec.json``, Apache-2.0).
- Their structure: the services, one GPU per worker, healthchecks, Redis AOF, SeaweedFS ``mini``,
  and every required variable defined in ``.env.example``.
- The Dockerfiles copy only files that exist, and the API image never gets torch.
- ``docker-compose config`` (Debian's docker-compose 1.29 parses without an engine; ``bash scripts/setup.sh --tests``
  installs it, and under CI=true its absence fails the run instead of skipping these checks).
- The worker's healthcheck script against a real Redis with a real RQ worker registration.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE_FILES = [DOCKER / "compose.yaml", DOCKER / "compose.workers.yaml"]
ENV_EXAMPLE = DOCKER / ".env.example"
SCHEMA = json.loads((Path(__file__).parent / "compose_spec.json").read_text())
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}
VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _env_example() -> dict[str, str]:
    pairs = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            pairs[name.strip()] = value.strip()
    return pairs


def _workers(compose: dict) -> dict[str, dict]:
    return {name: service for name, service in compose["services"].items() if name.startswith("worker")}


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_file_matches_the_compose_spec_schema(path):
    errors = sorted(jsonschema.Draft201909Validator(SCHEMA).iter_errors(_load(path)), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_the_schema_check_can_fail():
    """Guards the test above: a typo in a healthcheck must be caught by the vendored schema."""
    compose = _load(DOCKER / "compose.yaml")
    compose["services"]["api"]["healthcheck"]["intervall"] = "5s"
    assert list(jsonschema.Draft201909Validator(SCHEMA).iter_errors(compose))


def test_main_compose_has_the_whole_stack_with_healthchecks():
    compose = _load(DOCKER / "compose.yaml")
    services = compose["services"]
    assert {"api", "redis", "seaweedfs"} <= set(services) and len(_workers(compose)) >= 2
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        assert service.get("restart") == "unless-stopped", name
    assert services["api"]["build"]["dockerfile"] == "docker/api.Dockerfile"
    for dependency in ("redis", "seaweedfs"):
        assert services["api"]["depends_on"][dependency]["condition"] == "service_healthy"


def test_redis_keeps_an_append_only_file():
    redis = _load(DOCKER / "compose.yaml")["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert "/data" in " ".join(redis["volumes"])


def test_seaweedfs_runs_mini_with_credentials_from_the_environment():
    seaweed = _load(DOCKER / "compose.yaml")["services"]["seaweedfs"]
    assert seaweed["image"] == "chrislusf/seaweedfs:4.48"
    assert seaweed["command"][0] == "mini"
    assert "-master.telemetry=false" in seaweed["command"]
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert VARIABLE.fullmatch(seaweed["environment"][variable]), f"{variable} must come from .env, not the file"


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_each_worker_reserves_exactly_one_gpu(path):
    workers = _workers(_load(path))
    assert len(workers) >= 2
    reserved = []
    for name, worker in workers.items():
        devices = worker["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1 and devices[0]["capabilities"] == ["gpu"], name
        assert len(devices[0]["device_ids"]) == 1, f"{name} must reserve exactly one GPU"
        reserved += devices[0]["device_ids"]
        # The reserved GPU is the only one the container sees, as device 0.
        assert worker["environment"]["CUDA_VISIBLE_DEVICES"] == "0", name
        assert worker["build"]["dockerfile"] == "docker/worker.Dockerfile"
        assert worker["healthcheck"]["test"][-1] == "/usr/local/bin/hscr-worker-healthcheck"
    assert len(set(reserved)) == len(reserved), f"two workers share a GPU: {reserved}"


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_every_required_variable_is_in_env_example(path):
    example = _env_example()
    required = {m["name"] for m in VARIABLE.finditer(path.read_text()) if m["op"] in (":?", "?")}
    referenced = {m["name"] for m in VARIABLE.finditer(path.read_text())}
    assert referenced <= set(example), f"not in .env.example: {sorted(referenced - set(example))}"
    # The main host's address, set per worker host: deliberately empty in the example, so a worker host
    # that forgets it is refused instead of reaching for names that only resolve on the main host.
    empty = {name for name in required if not example[name]} - {"HSCR_REDIS_HOST", "HSCR_MAIN_S3_ENDPOINT"}
    assert not empty, f"required but empty in .env.example: {sorted(empty)}"


def _copies(dockerfile: Path) -> list[tuple[str, str]]:
    """(source, destination) of each COPY without --from (a build-context file)."""
    copies = []
    for line in dockerfile.read_text().splitlines():
        parts = line.split()
        if parts[:1] == ["COPY"] and not any(p.startswith("--from") for p in parts):
            sources = [p for p in parts[1:-1] if not p.startswith("--")]
            copies += [(source, parts[-1]) for source in sources]
    return copies


@pytest.mark.parametrize("name", ["api", "worker"])
def test_dockerfile_copies_only_files_that_exist_and_dockerignore_lets_them_in(name):
    dockerfile = DOCKER / f"{name}.Dockerfile"
    copies = _copies(dockerfile)
    assert copies
    ignore = (DOCKER / f"{name}.Dockerfile.dockerignore").read_text().splitlines()
    for source, _ in copies:
        assert (ROOT / source).exists(), f"{dockerfile.name} copies {source}, which does not exist"
        assert f"!{source}" in ignore, f"{source} is excluded from the build context by the .dockerignore"


def test_api_image_has_no_torch_and_worker_image_has_cuda_and_vllm():
    api = (DOCKER / "api.Dockerfile").read_text()
    assert {source for source, _ in _copies(DOCKER / "api.Dockerfile")} == {"client/", "jobs/", "service/"}
    assert not re.search(r"pip install[^\n]*(torch|vllm|/src/worker|/src/trainer)", api)
    worker = (DOCKER / "worker.Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:", worker, re.M)
    assert 'pip install "vllm==0.32.*"' in worker
    assert "/src/worker" in worker and "docker/worker_healthcheck.py" in worker
    # The worker carries the job lifecycle, never the API's code.
    assert "service/" not in {source for source, _ in _copies(DOCKER / "worker.Dockerfile")}


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_docker_compose_config_accepts_the_file(path, tmp_path):
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose (Debian's 1.29: `bash scripts/setup.sh --tests`) is not installed; "
                    "the schema and structure checks above still ran")
    env = {**os.environ, "HSCR_REDIS_HOST": "main-host", "HSCR_MAIN_S3_ENDPOINT": "http://main-host:8333"}
    result = subprocess.run([binary, "-f", str(path), "--env-file", str(ENV_EXAMPLE), "config", "--quiet"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_worker_host_without_the_main_hosts_s3_endpoint_is_refused():
    """The example's HSCR_S3_ENDPOINT names the main host's in-project server, which does not resolve on a
    worker-only host: the workers file asks for the main host's endpoint under its own name."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose (Debian's 1.29: `bash scripts/setup.sh --tests`) is not installed")
    env = {key: value for key, value in os.environ.items() if key != "HSCR_MAIN_S3_ENDPOINT"}
    env["HSCR_REDIS_HOST"] = "main-host"
    result = subprocess.run([binary, "-f", str(DOCKER / "compose.workers.yaml"), "--env-file", str(ENV_EXAMPLE),
                             "config", "--quiet"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0 and "set HSCR_MAIN_S3_ENDPOINT" in result.stderr


def test_docker_compose_config_refuses_missing_secrets(tmp_path):
    """Without the .env, the required secrets stop compose with our message (not a half-configured stack)."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose (Debian's 1.29: `bash scripts/setup.sh --tests`) is not installed")
    empty_env = tmp_path / "empty.env"
    empty_env.write_text("")
    env = {key: value for key, value in os.environ.items() if key not in _env_example()}
    result = subprocess.run([binary, "-f", str(DOCKER / "compose.yaml"), "--env-file", str(empty_env), "config",
                             "--quiet"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0 and "in docker/.env" in result.stderr


# --- the worker healthcheck, against a real Redis ---------------------------------------------------

def _run_healthcheck(redis_url: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DOCKER / "worker_healthcheck.py")], capture_output=True, text=True,
                          env={**os.environ, "HSCR_REDIS_URL": redis_url}, timeout=60)


def test_worker_healthcheck_follows_the_rq_heartbeat(private_redis_url):
    import redis
    from rq import Worker

    unhealthy = _run_healthcheck(private_redis_url)
    assert unhealthy.returncode == 1 and "no worker" in unhealthy.stdout

    worker = Worker(["hscr"], connection=redis.Redis.from_url(private_redis_url))
    worker.register_birth()
    worker.heartbeat()
    try:
        healthy = _run_healthcheck(private_redis_url)
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    finally:
        worker.register_death()
    assert _run_healthcheck(private_redis_url).returncode == 1


def test_worker_healthcheck_is_unhealthy_when_redis_is_unreachable(free_port):
    result = _run_healthcheck(f"redis://127.0.0.1:{free_port}/0")
    assert result.returncode == 1 and "Redis unreachable" in result.stdout
