"""deploy/: the compose file, Prometheus rules and the Grafana dashboard, checked against the code.

No Docker engine runs here, so the compose checks are structural, against the real thing
wherever there is one: compose commands are parsed by the CLI's own parser and run (migrate)
or probed (the healthchecks, against a running server and worker); every MEDIAVAULT_*
variable goes through Settings. promtool runs the alerting rules' unit tests
(deploy/prometheus/alerts_test.yml) and parses every dashboard query; every metric a rule,
a test series or a panel names is looked up in the prometheus_client registry that
mediavault.metrics fills.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase
from pydantic import SecretStr
from redis.asyncio import Redis

from mediavault import cli
from mediavault import metrics as mediavault_metrics
from mediavault.config import PREFIX, Settings, unknown_variable
from tests.conftest import running_worker
from tests.faults import proxied
from tests.helpers import serve_environment
from tests.test_shutdown import free_port, serving
from tests.test_supervisor import scrape
from workers.maintenance import JOBS
from workers.worker import HEALTH_CHECK_INTERVAL_SECONDS, health_check_key

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
PROMETHEUS_FILE = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS_FILE = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD_FILE = DEPLOY / "grafana" / "mediavault.json"

# What a user must export before `docker compose up`; anything else has a default.
REQUIRED_VARIABLES = {"MEDIAVAULT_JWT_SECRET"}
COMPOSE_ENV = {"MEDIAVAULT_JWT_SECRET": "compose-test-secret-0123456789-abcdefghij"}

# The services built from our Dockerfile and the CLI subcommand each runs.
OUR_SERVICES = {"migrate": ["migrate"], "server": ["serve"], "worker": ["worker"]}

FIVE_ALERTS = {
    "MediavaultUploadSuccessRateLow",
    "MediavaultHeavyReservations",
    "MediavaultTranscodeFailureRate",
    "MediavaultCronJobNotRun",
    "MediavaultLedgerAuditFailed",
}


# --- compose interpolation -----------------------------------------------------------------

_INTERPOLATION = re.compile(
    r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)|\$"
)


class MissingVariable(Exception):
    pass


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution ($$, $VAR, ${VAR}, ${VAR:-default}, ${VAR:?error}, and the forms without ':')."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        text = match.group(0)
        if text == "$$":
            return "$"
        if text == "$":
            raise ValueError(f"a lone '$' in {value!r}: write '$$' for a literal dollar")
        name = match.group("braced") or match.group("bare")
        op, arg = match.group("op"), match.group("arg") or ""
        current = env.get(name)
        unset = current is None or (op is not None and op.startswith(":") and current == "")
        if op in (":-", "-"):
            return arg if unset else current
        if op in (":?", "?"):
            if unset:
                raise MissingVariable(f"{name}: {arg}")
            return current
        return current or ""

    return _INTERPOLATION.sub(substitute, value)


def load_yaml(path: Path) -> Any:
    with path.open() as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def raw_compose() -> dict[str, Any]:
    return load_yaml(COMPOSE_FILE)


@pytest.fixture(scope="module")
def compose(raw_compose) -> dict[str, Any]:
    return interpolate(raw_compose, COMPOSE_ENV)


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict[str, Any]]:
    return compose["services"]


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def mediavault_env(service: dict[str, Any]) -> dict[str, str]:
    return {k: v for k, v in environment_of(service).items() if k.startswith("MEDIAVAULT_")}


def port_of(addr: str) -> int:
    return int(addr.rpartition(":")[2])


def published_ports(service: dict[str, Any]) -> list[tuple[int | None, int]]:
    """(host port, container port) pairs, short or long syntax."""
    pairs = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            published = entry.get("published")
            pairs.append((int(published) if published is not None else None, int(entry["target"])))
            continue
        spec = str(entry).split("/")[0]
        parts = spec.split(":")
        assert all(part.isdigit() for part in parts[-2:]), f"port ranges are not used here: {entry!r}"
        pairs.append((int(parts[-2]) if len(parts) >= 2 else None, int(parts[-1])))
    return pairs


# --- compose -------------------------------------------------------------------------------

TOP_LEVEL_KEYS = {"name", "services", "volumes", "networks", "configs", "secrets", "include"}
# Service keys of the Compose Specification (the common ones; extend when a new one is needed): catches typos
# such as `depend_on`, which compose would reject and which no engine here can show.
SERVICE_KEYS = {
    "annotations", "attach", "build", "cap_add", "cap_drop", "command", "configs", "container_name", "cpus",
    "depends_on", "deploy", "develop", "devices", "dns", "entrypoint", "env_file", "environment", "expose", "extends",
    "extra_hosts", "group_add", "healthcheck", "hostname", "image", "init", "ipc", "labels", "logging", "mem_limit",
    "network_mode", "networks", "pid", "platform", "ports", "privileged", "profiles", "pull_policy", "read_only",
    "restart", "runtime", "scale", "secrets", "security_opt", "shm_size", "stdin_open", "stop_grace_period",
    "stop_signal", "sysctls", "tmpfs", "tty", "ulimits", "user", "volumes", "working_dir",
}
HEALTHCHECK_KEYS = {"test", "interval", "timeout", "retries", "start_period", "start_interval", "disable"}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
COMPOSE_DURATION = re.compile(r"^(\d+(\.\d+)?(us|ms|s|m|h))+$")


def test_compose_parses_with_only_known_keys(raw_compose):
    assert isinstance(raw_compose, dict)
    unknown = {k for k in raw_compose if k not in TOP_LEVEL_KEYS and not k.startswith("x-")}
    assert not unknown, f"unknown top-level keys {unknown}"
    for name, service in raw_compose["services"].items():
        assert not set(service) - SERVICE_KEYS, f"{name}: unknown keys {set(service) - SERVICE_KEYS}"
        if "restart" in service:
            assert re.fullmatch(r"no|always|unless-stopped|on-failure(:\d+)?", service["restart"]), name
        for key in ("stop_grace_period",):
            if key in service:
                assert COMPOSE_DURATION.match(service[key]), f"{name}.{key}"


def test_compose_has_the_whole_stack(services):
    assert set(services) >= {"postgres", "redis", "minio", "createbucket", "migrate", "server", "worker", "prometheus", "grafana"}
    assert services["postgres"]["image"] == "postgres:15"
    assert services["redis"]["image"].startswith("redis:7")
    assert services["minio"]["image"].startswith("minio/minio")
    assert services["createbucket"]["image"].startswith("minio/mc")
    # The monitoring stack is optional: it only starts with --profile monitoring.
    for optional in ("prometheus", "grafana"):
        assert services[optional].get("profiles") == ["monitoring"]
    for core in ("postgres", "redis", "minio", "createbucket", "migrate", "server", "worker"):
        assert "profiles" not in services[core], f"{core} must start without a profile"


def test_a_missing_jwt_secret_stops_compose_with_a_message(raw_compose):
    with pytest.raises(MissingVariable, match="MEDIAVAULT_JWT_SECRET: set MEDIAVAULT_JWT_SECRET"):
        interpolate(raw_compose, {})
    # Nothing else is required: every other variable has a default.
    interpolate(raw_compose, {name: "x" * 40 for name in REQUIRED_VARIABLES})


def test_every_service_has_an_image_or_our_build(services):
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        if "build" not in service:
            assert re.fullmatch(r"[a-z0-9./_-]+(:[A-Za-z0-9._-]+)?", service["image"]), f"{name}: {service['image']!r}"
            continue
        build = service["build"]
        context = (DEPLOY / build["context"]).resolve()
        assert context == ROOT, f"{name} builds from {context}"
        assert (context / build.get("dockerfile", "Dockerfile")).resolve() == ROOT / "Dockerfile"
    assert set(OUR_SERVICES) == {name for name, service in services.items() if "build" in service}
    # One image for every process: the same tag, built once and reused.
    assert len({services[name]["image"] for name in OUR_SERVICES}) == 1


def test_our_commands_are_the_cli_subcommands_the_tests_run(services):
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["mediavault"\]$', dockerfile, re.M), "the image's entrypoint is the mediavault CLI"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["mediavault"] == "mediavault.cli:main"
    handlers = {"migrate": cli.cmd_migrate, "serve": cli.cmd_serve, "worker": cli.cmd_worker}
    for name, command in OUR_SERVICES.items():
        service = services[name]
        assert "entrypoint" not in service, f"{name} must keep the image's entrypoint"
        assert service["command"] == command
        args = cli.build_parser().parse_args(service["command"])
        assert args.func is handlers[command[0]]


def test_the_image_builds_the_c_extension_and_carries_the_libraries_the_imaging_loads():
    _, build, runtime = (ROOT / "Dockerfile").read_text().split("\nFROM ")
    copied = {name for line in re.findall(r"^COPY (?!--from)(.+) \S+$", build, re.M) for name in line.split()}
    # setup.py declares mediavault.imaging._pixels; without it `pip install .` builds no extension.
    assert {"pyproject.toml", "setup.py", "src", "workers"} <= copied
    # ctypes finds libturbojpeg at run time, so no build step notices if the image lacks it.
    installed = set(re.search(r"apt-get install -y --no-install-recommends ([^\\&]+)", runtime).group(1).split())
    assert {"libjpeg62-turbo", "libturbojpeg0", "libwebp7", "liblcms2-2"} <= installed
    assert "libturbojpeg0" in (ROOT / "scripts" / "install-system-deps.sh").read_text()


def settings_field(env_name: str) -> tuple[str, ...]:
    """MEDIAVAULT_JOBS__AUDIT_ACCOUNTS__AGE_SECONDS -> ("jobs", "audit_accounts", "age_seconds"); fails for names of no setting."""
    assert env_name.startswith(PREFIX)
    why = unknown_variable(env_name)
    assert why is None, f"{env_name} {why}"
    return tuple(env_name.removeprefix(PREFIX).lower().split("__"))


def test_settings_field_mapping_knows_nested_job_settings():
    assert settings_field("MEDIAVAULT_JOBS__AUDIT_ACCOUNTS__AGE_SECONDS") == ("jobs", "audit_accounts", "age_seconds")
    with pytest.raises(AssertionError):
        settings_field("MEDIAVAULT_JOBS__NO_SUCH_JOB__AGE_SECONDS")
    with pytest.raises(AssertionError):
        settings_field("MEDIAVAULT_GRPC_ADDRESS")


@pytest.fixture
def clean_env(monkeypatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("MEDIAVAULT_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_every_mediavault_variable_is_a_setting_with_a_valid_value(services, clean_env):
    seen = 0
    for name, service in services.items():
        env = mediavault_env(service)
        if not env:
            continue
        for var, value in env.items():
            clean_env.setenv(var, value)
        settings = Settings()  # the way every process reads them: validation errors raise here
        for var, value in env.items():
            field: Any = settings
            for part in settings_field(var):
                field = getattr(field, part)
            if isinstance(field, SecretStr):
                field = field.get_secret_value()
            if isinstance(field, str | Path):
                assert str(field) == value, f"{name}: {var}"
            seen += 1
        for var in env:
            clean_env.delenv(var)
    assert seen, "the compose file sets MEDIAVAULT_* variables"


def test_servers_and_workers_share_what_must_be_shared(services):
    shared = ("MEDIAVAULT_DATABASE_URL", "MEDIAVAULT_REDIS_URL", "MEDIAVAULT_QUEUE_NAME", "MEDIAVAULT_JWT_SECRET",
              "MEDIAVAULT_BLOB_BACKEND", "MEDIAVAULT_S3_BUCKET", "MEDIAVAULT_S3_ENDPOINT_URL", "MEDIAVAULT_S3_REGION",
              "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    envs = {name: environment_of(services[name]) for name in OUR_SERVICES}
    for var in shared:
        values = {name: env.get(var) for name, env in envs.items()}
        assert None not in values.values(), f"{var}: {values}"
        assert len(set(values.values())) == 1, f"{var}: {values}"
    server, worker = envs["server"], envs["worker"]
    assert server["MEDIAVAULT_BLOB_BACKEND"] == "s3"
    assert server["MEDIAVAULT_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert server["AWS_ACCESS_KEY_ID"] == environment_of(services["minio"])["MINIO_ROOT_USER"]
    assert server["AWS_SECRET_ACCESS_KEY"] == environment_of(services["minio"])["MINIO_ROOT_PASSWORD"]
    assert server["MEDIAVAULT_S3_BUCKET"] in " ".join(services["createbucket"]["command"]), "createbucket makes the bucket"
    database = environment_of(services["postgres"])
    assert server["MEDIAVAULT_DATABASE_URL"] == (
        f"postgresql://{database['POSTGRES_USER']}:{database['POSTGRES_PASSWORD']}@postgres:5432/{database['POSTGRES_DB']}"
    )
    assert server["MEDIAVAULT_REDIS_URL"].startswith("redis://redis:6379")
    assert port_of(server["MEDIAVAULT_METRICS_ADDR"]) != port_of(worker["MEDIAVAULT_METRICS_ADDR"])


def test_depends_on_targets_exist_and_can_satisfy_their_condition(services):
    graph: dict[str, set[str]] = {}
    for name, service in services.items():
        depends = service.get("depends_on", {})
        if isinstance(depends, list):
            depends = {target: {"condition": "service_started"} for target in depends}
        graph[name] = set(depends)
        for target, spec in depends.items():
            assert target in services, f"{name} depends on unknown {target}"
            condition = spec.get("condition", "service_started")
            assert condition in CONDITIONS, f"{name} -> {target}: {condition}"
            if condition == "service_healthy":
                assert services[target].get("healthcheck", {}).get("test"), f"{target} has no healthcheck for {name}"
            if condition == "service_completed_successfully":
                assert services[target].get("restart") == "no", f"{target} is a one-shot for {name}"
            assert set(services[target].get("profiles", [])) <= set(services[name].get("profiles", [])), (
                f"{name} depends on {target}, which only starts in another profile"
            )
    # No cycle, and migrations plus the bucket come before any server or worker.
    order: list[str] = []
    pending = dict(graph)
    while pending:
        ready = sorted(name for name, needs in pending.items() if needs <= set(order))
        assert ready, f"depends_on cycle among {sorted(pending)}"
        order.extend(ready)
        for name in ready:
            del pending[name]
    for name in ("server", "worker"):
        for needed, condition in (("migrate", "service_completed_successfully"),
                                  ("createbucket", "service_completed_successfully"),
                                  ("postgres", "service_healthy"), ("redis", "service_healthy"), ("minio", "service_healthy")):
            assert services[name]["depends_on"][needed]["condition"] == condition, f"{name} -> {needed}"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_healthchecks_are_well_formed(services):
    for name in ("postgres", "redis", "minio", "server", "worker", "prometheus"):
        check = services[name]["healthcheck"]
        assert not set(check) - HEALTHCHECK_KEYS, name
        test = check["test"]
        assert isinstance(test, list), name
        assert test[0] in ("CMD", "CMD-SHELL"), name
        assert len(test) > 1, name
        for key in ("interval", "timeout", "start_period"):
            if key in check:
                assert COMPOSE_DURATION.match(check[key]), f"{name}.{key}"
    assert services["postgres"]["healthcheck"]["test"][1] == "pg_isready"
    for name in ("server", "worker"):
        test = services[name]["healthcheck"]["test"]
        assert test[1:3] == ["python", "-c"], f"{name}: a python -c check in the image's venv"
        compile(test[3], f"<{name} healthcheck>", "exec")


def test_published_ports_do_not_collide_and_match_the_listeners(services):
    owners: dict[int, str] = {}
    for name, service in services.items():
        for host, _ in published_ports(service):
            if host is None:
                continue
            assert host not in owners, f"host port {host} published by {owners[host]} and {name}"
            owners[host] = name
    server_env, worker_env = environment_of(services["server"]), environment_of(services["worker"])
    server_ports = {target for _, target in published_ports(services["server"])}
    assert {port_of(server_env["MEDIAVAULT_GRPC_ADDR"]), port_of(server_env["MEDIAVAULT_METRICS_ADDR"])} <= server_ports
    assert server_env["MEDIAVAULT_GRPC_ADDR"].startswith("0.0.0.0:")
    assert server_env["MEDIAVAULT_METRICS_ADDR"].startswith("0.0.0.0:")
    # Workers publish nothing, so `--scale worker=N` works; Prometheus reaches them inside the network.
    assert not services["worker"].get("ports")
    assert str(port_of(worker_env["MEDIAVAULT_METRICS_ADDR"])) in {str(p) for p in services["worker"].get("expose", [])}
    assert worker_env["MEDIAVAULT_METRICS_ADDR"].startswith("0.0.0.0:")


def test_volumes_are_declared_and_bind_mounts_exist(compose, services):
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source, _, rest = volume.partition(":")
            target = rest.split(":")[0]
            assert target.startswith("/"), f"{name}: {volume}"
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in declared, f"{name} uses undeclared volume {source}"


def test_prometheus_scrapes_every_server_and_worker_and_loads_the_alerts(services):
    config = load_yaml(PROMETHEUS_FILE)
    mounts = dict(reversed(v.split(":")[:2]) for v in services["prometheus"]["volumes"])
    assert (DEPLOY / mounts[config["rule_files"][0]]).resolve() == ALERTS_FILE
    assert (DEPLOY / mounts["/etc/prometheus/prometheus.yml"]).resolve() == PROMETHEUS_FILE
    scraped = {}
    for job in config["scrape_configs"]:
        # The job metrics carry a `job` label of their own: the rules query it unrenamed.
        assert job.get("honor_labels") is True, job["job_name"]
        for sd in job["dns_sd_configs"]:
            for host in sd["names"]:
                scraped[host] = (job["job_name"], sd["port"])
    for name in ("server", "worker"):
        assert scraped[name][1] == port_of(environment_of(services[name])["MEDIAVAULT_METRICS_ADDR"]), name
    assert {job for job, _ in scraped.values()} == {"mediavault-server", "mediavault-worker"}


def test_grafana_is_provisioned_with_the_dashboard(services):
    mounts = {target: source for source, target in (v.split(":")[:2] for v in services["grafana"]["volumes"])}
    provisioning = (DEPLOY / mounts["/etc/grafana/provisioning"]).resolve()
    datasources = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert any(d["type"] == "prometheus" and d["url"] == "http://prometheus:9090" and d.get("isDefault") for d in datasources)
    providers = load_yaml(provisioning / "dashboards" / "mediavault.yml")["providers"]
    dashboards_dir = providers[0]["options"]["path"]
    mounted = {target: (DEPLOY / source).resolve() for target, source in mounts.items()}
    assert mounted[f"{dashboards_dir}/mediavault.json"] == DASHBOARD_FILE


# --- the image's commands, run the way the tests run them ---------------------------------------


def process_env(service: dict[str, Any], **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDIAVAULT_")}
    env.update(environment_of(service))
    env.update(overrides)
    return env


async def run(argv: list[str], env: dict[str, str], timeout: float = 60) -> tuple[int, str]:
    # Asynchronously: the server and worker under test live in this event loop.
    process = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout)
    return process.returncode, output.decode()


def in_venv(test: list[str]) -> list[str]:
    """A compose healthcheck's CMD, with the image's `python` (first on PATH there) as this interpreter."""
    assert test[0] == "CMD"
    assert test[1] == "python"
    return [sys.executable, *test[2:]]


async def test_migrate_service_command_runs(services, database_url):
    service = services["migrate"]
    code, output = await run(
        [sys.executable, "-m", "mediavault.cli", *service["command"]],
        process_env(service, MEDIAVAULT_DATABASE_URL=database_url),
    )
    assert code == 0, output
    assert "applied 0 migration(s)" in output


async def test_server_healthcheck_passes_against_a_serving_server(services, server):
    service = services["server"]
    check = in_venv(service["healthcheck"]["test"])
    code, output = await run(check, process_env(service, MEDIAVAULT_GRPC_ADDR=f"0.0.0.0:{server.grpc_port}"))
    assert code == 0, output


async def test_server_healthcheck_fails_without_a_server(services, closed_port):
    service = services["server"]
    check = in_venv(service["healthcheck"]["test"])
    code, _ = await run(check, process_env(service, MEDIAVAULT_GRPC_ADDR=f"0.0.0.0:{closed_port}"))
    assert code != 0


def worker_env(service: dict[str, Any], settings: Settings) -> dict[str, str]:
    """The service's environment with the Redis, queue and cleanup jobs of settings."""
    jobs = {f"MEDIAVAULT_JOBS__{name.upper()}__ENABLED": str(getattr(settings.jobs, name).enabled).lower() for name in JOBS}
    return process_env(service, MEDIAVAULT_REDIS_URL=settings.redis_url, MEDIAVAULT_QUEUE_NAME=settings.queue_name, **jobs)


async def test_worker_healthcheck_passes_against_a_running_worker(services, worker):
    service = services["worker"]
    check = in_venv(service["healthcheck"]["test"])
    settings = worker.ctx["settings"]
    env = worker_env(service, settings)
    for _ in range(100):  # the worker records its health once it polls
        code, output = await run(check, env)
        if code == 0:
            break
        await asyncio.sleep(0.1)
    assert code == 0, output
    # A worker that stops polling (hung) fails its check within the interval and a second.
    ttl = await worker.pool.pttl(health_check_key(settings.queue_name))
    assert 0 < ttl <= (HEALTH_CHECK_INTERVAL_SECONDS + 1) * 1000
    code, _ = await run(check, {**env, "MEDIAVAULT_QUEUE_NAME": f"{settings.queue_name}:nobody-polls-this"})
    assert code != 0
    # This process has no cron worker: with cleanup jobs enabled a worker process must have one.
    code, _ = await run(check, {**env, **{f"MEDIAVAULT_JOBS__{name.upper()}__ENABLED": "true" for name in JOBS}})
    assert code != 0


async def test_worker_healthcheck_passes_while_another_worker_process_stops(services, make_settings):
    settings = make_settings(queue_name=f"mediavault-test-health:{uuid.uuid4().hex}", transcode_workers=1)
    service = services["worker"]
    env = worker_env(service, settings)
    check = in_venv(service["healthcheck"]["test"])
    queues = (settings.queue_name, settings.video_queue)
    redis = Redis.from_url(settings.redis_url)
    try:
        async with running_worker(settings):
            replica = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "mediavault.cli", "worker",
                env={**env, "MEDIAVAULT_DATABASE_URL": settings.database_url, "MEDIAVAULT_BLOB_BACKEND": "fs",
                     "MEDIAVAULT_BLOB_DIR": str(settings.blob_dir), "MEDIAVAULT_TRANSCODE_WORKERS": "1",
                     "MEDIAVAULT_METRICS_ADDR": ""},
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            )
            ours = [health_check_key(queue) for queue in queues]
            theirs = [health_check_key(queue, replica.pid) for queue in queues]
            try:
                for _ in range(600):  # both processes' workers record their health once they poll
                    if await redis.exists(*ours, *theirs) == len(ours) + len(theirs):
                        break
                    await asyncio.sleep(0.1)
                else:
                    raise AssertionError("the worker processes never recorded their health")
            finally:
                replica.send_signal(signal.SIGTERM)
                _, stderr = await asyncio.wait_for(replica.communicate(), 60)
            assert replica.returncode == 0, stderr.decode()
            assert not await redis.exists(*theirs), "the stopped process's close deletes its own records"
            code, output = await run(check, env)
    finally:
        await redis.aclose()
    assert code == 0, output


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- metrics and PromQL ----------------------------------------------------------------------
# promtool (Debian's prometheus package, from scripts/install-system-deps.sh) parses and runs the
# PromQL; the checks here look up the names an expression or a test series uses in what the
# code exports.

PROMTOOL = shutil.which("promtool")
ALERTS_TEST_FILE = DEPLOY / "prometheus" / "alerts_test.yml"
TARGET_LABELS = {"instance", "job"}  # added by Prometheus to every scraped series
SCRAPE_JOBS = {"mediavault-server", "mediavault-worker"}
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "unknown": ("",),
}
PROM_DURATION = r"(\d+(ms|s|m|h|d|w|y))+"
_METRIC_NAME = re.compile(r"\b(?:mediavault_[a-z0-9_]+|up)\b")
_SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL, "no promtool: scripts/install-system-deps.sh installs Debian's prometheus package"
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=cwd, timeout=120, check=False)


def known_metrics() -> dict[str, set[str]]:
    """Every sample name a process may export (mediavault.metrics plus the default collectors) -> its label names."""
    labels_of = {
        wrapper._name: set(wrapper._labelnames)
        for wrapper in vars(mediavault_metrics).values()
        if isinstance(wrapper, MetricWrapperBase)
    }
    # A SetGauge is in the registry only once this process has set it. Under `serve --processes N`
    # a gauge in a liveall mode has a series per process, labelled pid.
    names: dict[str, set[str]] = {"up": set()} | {
        gauge.name: {"pid"} if gauge.multiprocess_mode == "liveall" else set()
        for gauge in vars(mediavault_metrics).values()
        if isinstance(gauge, mediavault_metrics.SetGauge)
    }
    for family in REGISTRY.collect():
        base = family.name
        for suffix in SUFFIXES[family.type]:
            labels = names.get(base + suffix, set()) | labels_of.get(base, set())
            if suffix == "_bucket":
                labels.add("le")
            names[base + suffix] = labels | {sample_label for sample in family.samples for sample_label in sample.labels}
    return names


def source_literals() -> set[str]:
    """Every string literal and class name in the code: label values the rules or tests use must be among them
    (a transcode failure's reason is the exception's class name)."""
    literals = set()
    for path in [*(ROOT / "src" / "mediavault").rglob("*.py"), *(ROOT / "workers").rglob("*.py")]:
        text = path.read_text()
        literals.update(re.findall(r"""["']([A-Za-z0-9_ -]+)["']""", text))
        literals.update(re.findall(r"^class (\w+)", text, re.M))
    return literals | set(JOBS) | SCRAPE_JOBS


def check_names(expr: str, metrics: dict[str, set[str]], literals: set[str]) -> set[str]:
    """Fails unless every metric the expression (or series) names is exported, with the labels its matchers
    and groupings name and values the code sets; returns the metrics."""
    used = set(_METRIC_NAME.findall(expr))
    assert used, f"{expr!r} reads no metric"
    unknown = used - set(metrics)
    assert not unknown, f"{sorted(unknown)} in {expr!r}: not metrics mediavault exports"
    for name, matchers in _SELECTOR.findall(expr):
        assert name in metrics, f"{name} in {expr!r}: not a metric mediavault exports"
        for label, op, value in _MATCHER.findall(matchers):
            assert label in metrics[name] | TARGET_LABELS, f"{name} has no label {label} ({expr!r})"
            if label in ("instance", "pid", "slot"):
                continue
            if op in ("=~", "!~"):
                assert re.fullmatch(r"[A-Za-z0-9_ -]+(\|[A-Za-z0-9_ -]+)*", value), f"keep regexes to alternations: {expr!r}"
            for one in value.split("|"):
                assert one in literals, f'{name}{{{label}{op}"{value}"}}: the code never sets {one!r}'
    allowed = set().union(*(metrics[name] for name in used)) | TARGET_LABELS
    grouping = {label.strip() for labels in _GROUPING.findall(expr) for label in labels.split(",") if label.strip()}
    assert grouping <= allowed, f"grouping by {grouping - allowed} in {expr!r}"
    return used


def test_the_name_checks_catch_mistakes():
    metrics, literals = known_metrics(), source_literals()
    assert "mediavault_rpc_duration_seconds_bucket" in metrics
    assert "mediavault_rpc_total" in metrics
    assert "le" in metrics["mediavault_rpc_duration_seconds_bucket"]
    assert check_names('sum by (method) (rate(mediavault_rpc_total{outcome!="OK"}[5m])) > 0', metrics, literals) == {
        "mediavault_rpc_total"
    }
    for broken in (
        "rate(mediavault_rpc_totl[5m])",  # no such metric
        'sum(rate(mediavault_rpc_total{outcom="OK"}[5m]))',  # no such label
        "sum by (nope) (rate(mediavault_rpc_total[5m]))",  # grouping by a label nobody has
        'mediavault_transcode_total{outcome="exploded"}',  # a value the code never sets
    ):
        with pytest.raises(AssertionError):
            check_names(broken, metrics, literals)


# --- alerts ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def alert_rules() -> list[dict[str, Any]]:
    groups = load_yaml(ALERTS_FILE)["groups"]
    assert len({g["name"] for g in groups}) == len(groups)
    return [rule for group in groups for rule in group["rules"]]


def test_alerts_parse_and_include_the_five_the_old_system_had(alert_rules):
    names = {rule["alert"] for rule in alert_rules}
    assert names >= FIVE_ALERTS
    for rule in alert_rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        annotations = rule["annotations"]
        for key in ("summary", "description", "runbook"):
            assert annotations.get(key, "").strip(), f"{rule['alert']}: {key}"
        assert rule["alert"] in annotations["runbook"], f"{rule['alert']}: the runbook hint names its paragraph in docs/operations.md"
        if "for" in rule:
            assert re.fullmatch(PROM_DURATION, rule["for"]), rule["alert"]
        for text in annotations.values():
            assert text.count("{{") == text.count("}}"), rule["alert"]
    # promtool's lint: rules of one name must differ in their static labels.
    keys = [(rule["alert"], tuple(sorted(rule["labels"].items()))) for rule in alert_rules]
    assert len(keys) == len(set(keys))


def test_alert_rules_pass_their_promtool_unit_tests():
    result = promtool("test", "rules", str(ALERTS_TEST_FILE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_unit_tests_fail_when_a_rule_changes(tmp_path):
    # A threshold moved from 90% to 20%: the test expecting the alert at 25% must fail.
    rules = ALERTS_FILE.read_text()
    assert rules.count(") < 0.9\n") == 1
    (tmp_path / ALERTS_FILE.name).write_text(rules.replace(") < 0.9\n", ") < 0.2\n"))
    (tmp_path / ALERTS_TEST_FILE.name).write_text(ALERTS_TEST_FILE.read_text())
    result = promtool("test", "rules", ALERTS_TEST_FILE.name, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "alertname: MediavaultUploadSuccessRateLow, time: 40m" in result.stdout + result.stderr


def test_every_alert_fires_in_a_unit_test_on_series_mediavault_exports(alert_rules):
    tests = load_yaml(ALERTS_TEST_FILE)["tests"]
    fired = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert fired == {rule["alert"] for rule in alert_rules}
    metrics, literals = known_metrics(), source_literals()
    for test in tests:
        for series in test["input_series"]:
            check_names(series["series"], metrics, literals)


def test_every_alert_expression_reads_real_metrics_labels_and_values(alert_rules):
    metrics, literals = known_metrics(), source_literals()
    for rule in alert_rules:
        check_names(rule["expr"], metrics, literals)


async def test_the_database_alert_fires_on_what_a_server_cut_from_postgresql_exports(alert_rules, database_url, redis_url, tmp_path):
    """The series of a real server, scraped while PostgreSQL answers and once it no longer does, are
    the input of the rule: it fires on the second, after its `for`, and not on the first."""
    (rule,) = [rule for rule in alert_rules if rule["alert"] == "MediavaultDatabaseUnreachable"]
    async with (
        proxied(database_url) as proxy,
        serve_environment(
            proxy.url_for(database_url), redis_url, tmp_path / "blobs",
            MEDIAVAULT_METRICS_ADDR=f"127.0.0.1:{free_port()}", MEDIAVAULT_HEALTH_PROBE_SECONDS="0.2",
        ) as env,
        serving(env),
    ):
        reachable = (await scrape(env))["mediavault_database_up"]
        await proxy.down()
        try:
            deadline = asyncio.get_running_loop().time() + 30
            while (cut := (await scrape(env))["mediavault_database_up"]) == reachable:
                assert asyncio.get_running_loop().time() < deadline, f"still {cut} with PostgreSQL cut off"
                await asyncio.sleep(0.1)
        finally:
            await proxy.up()
    assert [value for _, value in reachable] == [1.0]
    assert [labels for labels, _ in cut] == [labels for labels, _ in reachable]

    target = {"instance": "server-1:9464", "job": "mediavault-server"}
    series = [
        {
            "series": "mediavault_database_up{" + ",".join(f'{k}="{v}"' for k, v in {**labels, **target}.items()) + "}",
            "values": f"{up:g}x5 {down:g}x10",
        }
        for (labels, up), (_, down) in zip(reachable, cut, strict=True)
    ]
    fired = {"exp_labels": {**rule["labels"], **target}}
    # The rule as it is but its annotations, which the unit tests of alerts_test.yml check.
    (tmp_path / "rule.yml").write_text(yaml.safe_dump({"groups": [{"name": "one", "rules": [
        {key: value for key, value in rule.items() if key != "annotations"}
    ]}]}))
    (tmp_path / "test.yml").write_text(yaml.safe_dump({
        "rule_files": ["rule.yml"],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": [
            {"eval_time": "5m", "alertname": rule["alert"], "exp_alerts": []},
            {"eval_time": "7m", "alertname": rule["alert"], "exp_alerts": []},
            {"eval_time": "10m", "alertname": rule["alert"], "exp_alerts": [fired]},
        ]}],
    }))
    result = promtool("test", "rules", "test.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def duration_seconds(text: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([smhdw])", text))


def test_cron_alerts_cover_every_job_at_two_to_three_times_its_schedule(alert_rules, clean_env):
    settings = Settings()
    cron_rules = [rule for rule in alert_rules if rule["alert"] == "MediavaultCronJobNotRun"]
    for name in JOBS:
        schedule = getattr(settings.jobs, name).every_seconds
        stale = [r for r in cron_rules if re.search(rf'last_success_timestamp_seconds\{{job="{name}"\}}\) > (\d+)', r["expr"])]
        assert len(stale) == 1, f"{name}: one rule on the age of the last success"
        threshold = int(re.search(r"> (\d+)\s*$", stale[0]["expr"]).group(1))
        assert 2 * schedule <= threshold <= 3 * schedule, f"{name}: {threshold} s for a {schedule} s schedule"
        missing = [r for r in cron_rules if r["expr"].strip() == f'absent(mediavault_job_last_success_timestamp_seconds{{job="{name}"}})']
        assert len(missing) == 1, f"{name}: one rule for no success reported at all"
        assert duration_seconds(missing[0]["for"]) == threshold, name


def test_backlog_alerts_cover_the_photo_and_video_queues_each_above_the_longest_job_it_may_wait_behind(alert_rules, clean_env):
    settings = Settings()
    longest_job = {
        "photo": settings.transcode_timeout_seconds,
        "video": settings.video_timeout_seconds(settings.video_max_duration_seconds),
    }
    thresholds = {}
    for rule in alert_rules:
        if rule["alert"] == "MediavaultQueueBacklog":
            queue, threshold = re.fullmatch(
                r'max by \(queue\) \(mediavault_queue_oldest_waiting_seconds\{queue="(\w+)"\}\) > (\d+)\s*', rule["expr"]
            ).groups()
            assert rule["labels"]["queue"] == queue
            thresholds[queue] = int(threshold)
    assert thresholds.keys() == longest_job.keys()
    for queue, seconds in longest_job.items():
        # Over one job's limit (a wait behind a busy slot is no backlog), within 20 of them.
        assert seconds < thresholds[queue] <= 20 * seconds, f"{queue}: {thresholds[queue]} s for jobs of up to {seconds} s"


def test_ledger_alert_fires_on_mismatches_and_on_failed_audits(alert_rules):
    exprs = [rule["expr"] for rule in alert_rules if rule["alert"] == "MediavaultLedgerAuditFailed"]
    assert any("mediavault_ledger_mismatches" in e for e in exprs)
    assert any('mediavault_job_runs_total{job="audit_accounts",outcome="failed"}' in e for e in exprs)
    (upload,) = [rule["expr"] for rule in alert_rules if rule["alert"] == "MediavaultUploadSuccessRateLow"]
    assert "< 0.9" in upload
    assert 'outcome="finalized"' in upload
    (heavy,) = [rule["expr"] for rule in alert_rules if rule["alert"] == "MediavaultHeavyReservations"]
    assert "mediavault_heavy_reservation_accounts" in heavy
    (transcode,) = [rule["expr"] for rule in alert_rules if rule["alert"] == "MediavaultTranscodeFailureRate"]
    assert 'mediavault_transcode_total{outcome="failed"}' in transcode


# --- dashboard -------------------------------------------------------------------------------

GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
DASHBOARD_METRICS = {
    "mediavault_rpc_total", "mediavault_rpc_duration_seconds_bucket", "mediavault_upload_outcomes_total",
    "mediavault_storage_bytes", "mediavault_transcode_duration_seconds_bucket", "mediavault_transcode_total",
    "mediavault_queue_depth", "mediavault_job_runs_total", "mediavault_job_last_success_timestamp_seconds",
    "mediavault_feed_cache_total", "mediavault_rate_limit_decisions_total", "mediavault_redis_fallback_total",
    "mediavault_database_up", "mediavault_http_requests_total", "mediavault_queue_oldest_waiting_seconds",
    "mediavault_queue_sampled_timestamp_seconds", "mediavault_worker_job_slots_in_use", "mediavault_worker_job_slots_max",
    "mediavault_worker_db_connections_in_use", "mediavault_worker_db_connections_max", "mediavault_worker_redis_up",
    "mediavault_server_db_connections_in_use", "mediavault_server_db_connections_max", "mediavault_db_connection_wait_seconds_bucket",
}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_FILE.read_text())


def panels_of(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows
    return out


def test_dashboard_is_a_grafana_dashboard_with_a_datasource_variable(dashboard):
    assert dashboard["uid"]
    assert dashboard["title"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    (variable,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variable["query"] == "prometheus"
    ids = [panel["id"] for panel in panels_of(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in panels_of(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["w"] > 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        assert grid["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["type"] in ("timeseries", "stat", "gauge", "bargauge", "table", "heatmap", "text"), panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": f"${{{variable['name']}}}"}, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]


def promtool_check_queries(queries: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """promtool's parse of each query, as the expression of a recording rule named by its key."""
    rules = tmp_path / "queries.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "queries", "rules": [
        {"record": record, "expr": expr} for record, expr in queries.items()
    ]}]}))
    return promtool("check", "rules", str(rules))


def test_promtool_refuses_a_query_that_is_not_promql(tmp_path):
    result = promtool_check_queries({"broken:unbalanced": "sum(rate(mediavault_rpc_total[5m])"}, tmp_path)
    assert result.returncode == 1
    assert "unclosed left parenthesis" in result.stdout + result.stderr


def dashboard_queries(dashboard: dict[str, Any]) -> dict[str, str]:
    """Every panel query, Grafana's variables given values, by a recording rule name of its panel and target."""
    queries: dict[str, str] = {}
    for panel in panels_of(dashboard):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"{panel['title']}: undefined variable in {expr!r}"
            queries[f"dashboard:panel_{panel['id']}:{target['refId']}"] = expr
    return queries


def test_every_dashboard_query_is_promql_over_real_metrics(dashboard, tmp_path):
    queries = dashboard_queries(dashboard)
    result = promtool_check_queries(queries, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout
    metrics, literals = known_metrics(), source_literals()
    seen: set[str] = set()
    for expr in queries.values():
        seen |= check_names(expr, metrics, literals)
    assert seen >= DASHBOARD_METRICS, f"no panel for {DASHBOARD_METRICS - seen}"
