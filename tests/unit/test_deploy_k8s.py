"""deploy/k8s/ is valid Kubernetes and agrees with the code it deploys.

No cluster runs here: every manifest is validated offline against the
Kubernetes JSON schemas that the kubernetes-validate package ships, and each
reference is checked against the repository: commands parsed by the real
parsers, ports against client/constants.py and gunicorn's config, HEMOTRIAGE_*
names against what the code reads, probe paths against the console's routes
and the real Triton, the HPA metric against Triton's own metric names.
"""

import argparse
import re
import urllib.parse
import urllib.request
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from client.constants import (
    DEFAULT_CONSOLE_PORT,
    DEFAULT_GRPC_PORT,
    DEFAULT_HTTP_PORT,
    DEFAULT_METRICS_PORT,
    ENV_PREFIX,
    MODEL_REPOSITORY,
    REPO_ROOT,
)
from client.triton_pool import parse_urls
from tests.unit.test_deploy_compose import _invocations

K8S = REPO_ROOT / "deploy" / "k8s"
ADAPTER_RULES = K8S / "monitoring" / "prometheus-adapter-rules.yaml"
GUNICORN_CONF = REPO_ROOT / "console" / "gunicorn.conf.py"
#: Oldest Kubernetes the manifests are meant for (autoscaling/v2 and every field used are GA)
#: and the newest whose schemas the validator ships.
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
#: Variables libpq itself reads (https://www.postgresql.org/docs/15/libpq-envars.html).
LIBPQ_ENVIRONMENT = {"PGPASSWORD"}


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.fixture(scope="module")
def resources() -> dict[tuple[str, str], dict]:
    """Every resource of deploy/k8s by (kind, name)."""
    found = {}
    for path in _manifest_files():
        for document in yaml.safe_load_all(path.read_text()):
            key = (document["kind"], document["metadata"]["name"])
            assert key not in found, f"{key} defined twice"
            found[key] = document
    return found


@pytest.fixture(scope="module")
def console_app(tmp_path_factory):
    from console import create_app

    storage = tmp_path_factory.mktemp("storage")
    return create_app({"TESTING": True, "STORAGE_DIR": str(storage), "DICOM_PORT": 0})


def _pod(resource: dict) -> dict:
    return resource["spec"]["template"]["spec"]


def _containers(resource: dict) -> list[dict]:
    pod = _pod(resource)
    return [*pod.get("initContainers", []), *pod["containers"]]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _port(container: dict, name: str) -> int:
    return next(p["containerPort"] for p in container["ports"] if p["name"] == name)


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: p.name)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifest_is_valid_against_the_kubernetes_schemas(path, version):
    for document in yaml.safe_load_all(path.read_text()):
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{path.name} {document['kind']}: {e.message} at {list(e.path)}")


def test_kustomization_applies_every_manifest_into_the_namespace(resources):
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [p.name for p in _manifest_files()]
    assert ("Namespace", kustomization["namespace"]) in resources


def test_volumes_claim_declared_volumes_and_services_select_their_pods(resources):
    claims = {name for kind, name in resources if kind == "PersistentVolumeClaim"}
    labelled = {}
    for (kind, name), resource in resources.items():
        if kind in ("Deployment", "StatefulSet", "Job"):
            for volume in _pod(resource).get("volumes", []):
                claim = volume.get("persistentVolumeClaim")
                assert claim is None or claim["claimName"] in claims, (name, volume)
            labels = resource["spec"]["template"]["metadata"]["labels"]
            selector = resource["spec"].get("selector", {}).get("matchLabels", labels)
            assert selector.items() <= labels.items(), name
            labelled[name] = labels
    for (kind, name), service in resources.items():
        if kind == "Service":
            assert any(
                service["spec"]["selector"].items() <= labels.items()
                for labels in labelled.values()
            ), name


def test_gpu_goes_to_triton_and_the_engine_build_only(resources):
    for (kind, name), resource in resources.items():
        if kind in ("Deployment", "StatefulSet", "Job"):
            for container in _containers(resource):
                limits = container.get("resources", {}).get("limits", {})
                gpu = limits.get("nvidia.com/gpu")
                expected = 1 if container["name"] in ("triton", "build-engines") else None
                assert gpu == expected, (name, container["name"])


def test_triton_runs_the_compose_server_with_its_flags_on_the_built_repository(resources):
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]
    [triton] = _pod(resources[("StatefulSet", "triton")])["containers"]
    # docker-compose's triton command is checked flag by flag against tritonserver --help.
    assert triton["image"] == compose["triton"]["image"]
    assert triton["args"] == compose["triton"]["command"]
    [repository] = [
        a.split("=", 1)[1] for a in triton["args"] if a.startswith("--model-repository")
    ]
    mounts = {m["mountPath"]: m for m in triton["volumeMounts"]}
    assert mounts[repository]["readOnly"] and mounts[repository]["name"] == "model-repository"
    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    assert ports == {
        "http": DEFAULT_HTTP_PORT,
        "grpc": DEFAULT_GRPC_PORT,
        "metrics": DEFAULT_METRICS_PORT,
    }
    for probe in ("startupProbe", "readinessProbe"):
        assert triton[probe]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert triton["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    pod = resources[("StatefulSet", "triton")]["spec"]["template"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(DEFAULT_METRICS_PORT)


def test_engine_job_runs_the_compose_build_commands_into_the_image_repository(resources):
    from build_engines.commands import add_engine_commands
    from build_engines.data import data_dir_from_env

    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]
    job = resources[("Job", "build-engines")]
    seed, build = _containers(job)
    program = ["python", "-m", "build_engines"]
    calls = _invocations(build, program)
    assert [args[0] for args in calls] == ["export", "quantize", "build-trt"]
    assert calls == _invocations(compose["engines"], program)  # the GPU build compose runs
    parser = argparse.ArgumentParser(prog="python -m build_engines")
    add_engine_commands(parser.add_subparsers(dest="command", required=True))
    for args in calls:
        parser.parse_args(args)  # exits (SystemExit) on an unknown subcommand or flag
    # The image's WORKDIR is /app (Dockerfile), so the code's MODEL_REPOSITORY is here:
    workdir = re.search(r"^WORKDIR (\S+)$", (REPO_ROOT / "Dockerfile").read_text(), re.M)[1]
    image_repository = f"{workdir}/{MODEL_REPOSITORY.relative_to(REPO_ROOT)}"
    assert {m["mountPath"]: m["name"] for m in build["volumeMounts"]}[image_repository] == (
        "model-repository"
    )
    # ... which the empty volume is seeded from before the build.
    [seed_mount] = seed["volumeMounts"]
    assert seed["command"] == ["cp", "-R", f"{image_repository}/.", f"{seed_mount['mountPath']}/"]
    data_dir = _env(build)[f"{ENV_PREFIX}DATA_DIR"]["value"]
    mounts = {m["mountPath"]: m for m in build["volumeMounts"]}
    assert mounts[data_dir]["readOnly"]
    with pytest.MonkeyPatch.context() as env:
        env.setenv(f"{ENV_PREFIX}DATA_DIR", data_dir)
        assert data_dir_from_env() == Path(data_dir)  # the build reads this very name


def test_triton_waits_for_the_marker_the_engine_job_writes_after_the_build(resources):
    [_, build] = _containers(resources[("Job", "build-engines")])
    steps = [s.strip() for s in " ".join(build["command"][2:]).split("&&")]
    build_mount = {m["name"]: m["mountPath"] for m in build["volumeMounts"]}["model-repository"]
    assert steps[0] == f"rm -f {build_mount}/.built"  # a rebuild starts unmarked
    assert steps[-1] == f"touch {build_mount}/.built"  # and is marked only if every step passed
    statefulset = resources[("StatefulSet", "triton")]
    [wait] = _pod(statefulset)["initContainers"]
    [triton] = _pod(statefulset)["containers"]
    wait_mount = {m["name"]: m["mountPath"] for m in wait["volumeMounts"]}["model-repository"]
    assert f"until [ -f {wait_mount}/.built ]" in wait["command"][2]
    assert wait["image"] == triton["image"]


def test_console_runs_gunicorn_on_the_console_port_with_real_probes(resources, console_app):
    console = resources[("Deployment", "console")]
    container = next(c for c in _pod(console)["containers"] if c["name"] == "console")
    assert container["command"][:2] == ["gunicorn", "-c"]
    assert (REPO_ROOT / container["command"][2]) == GUNICORN_CONF
    bind = _env(container)[f"{ENV_PREFIX}CONSOLE_BIND"]["value"]
    assert bind == f"0.0.0.0:{DEFAULT_CONSOLE_PORT}"
    assert _port(container, "http") == DEFAULT_CONSOLE_PORT
    routes = {rule.rule for rule in console_app.url_map.iter_rules()}
    probes = {p: container[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe")}
    assert probes == {"readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    assert set(probes.values()) <= routes
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    storage = re.search(rf"{ENV_PREFIX}STORAGE_DIR=(\S+)", dockerfile)[1]
    assert mounts[storage] == "instance"


def test_several_consoles_share_postgresql_and_a_read_write_many_store(resources):
    console = resources[("Deployment", "console")]
    assert console["spec"]["replicas"] >= 2
    assert console["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    [claim] = [v["persistentVolumeClaim"]["claimName"] for v in _pod(console)["volumes"]]
    assert resources[("PersistentVolumeClaim", claim)]["spec"]["accessModes"] == ["ReadWriteMany"]
    postgres = resources[("StatefulSet", "postgres")]
    [server] = _pod(postgres)["containers"]
    server_env = _env(server)
    service = resources[("Service", postgres["spec"]["serviceName"])]
    [port] = service["spec"]["ports"]
    assert _port(server, port["targetPort"]) == port["port"]
    for container in _containers(console):
        env = _env(container)
        url = urllib.parse.urlsplit(env[f"{ENV_PREFIX}DATABASE_URL"]["value"])
        assert (url.scheme, url.hostname, url.port) == (
            "postgresql",
            service["metadata"]["name"],
            port["port"],
        )
        assert url.username == server_env["POSTGRES_USER"]["value"] and url.password is None
        assert url.path == f"/{server_env['POSTGRES_DB']['value']}"
        # libpq's own variable carries the password, from the secret the server reads.
        assert env["PGPASSWORD"]["valueFrom"] == server_env["POSTGRES_PASSWORD"]["valueFrom"]
        assert env.get(f"{ENV_PREFIX}INBOX_DIR", {"value": ""})["value"] == ""
    init = [c["command"][2:] for c in _pod(console)["initContainers"]]
    assert init[0] == ["console", "init-db"]  # the schema before anything uses it


def test_console_init_containers_run_registered_commands_with_valid_options(resources, console_app):
    init_db, create_admin = _pod(resources[("Deployment", "console")])["initContainers"]
    for container in (init_db, create_admin):
        program, name, *args = container["command"][2:]
        assert container["command"][:2] == ["python", "-m"] and program == "console"
        command = console_app.cli.commands[name]
        command.make_context(name, list(args))  # raises on an unknown option
    assert f"{ENV_PREFIX}ADMIN_PASSWORD" in {p.envvar for p in command.params}


def test_console_environment_names_are_settings_the_console_reads(resources, console_app):
    from console import DEFAULTS

    read_by_gunicorn = set(re.findall(r"\{ENV_PREFIX\}(\w+)", GUNICORN_CONF.read_text()))
    click_envvars = {
        p.envvar.removeprefix(ENV_PREFIX)
        for command in console_app.cli.commands.values()
        for p in command.params
        if isinstance(getattr(p, "envvar", None), str)
    }
    known = set(DEFAULTS) | read_by_gunicorn | click_envvars
    for container in _containers(resources[("Deployment", "console")]):
        for name in _env(container).keys() - LIBPQ_ENVIRONMENT:
            assert name.startswith(ENV_PREFIX) and name.removeprefix(ENV_PREFIX) in known, name


def test_console_lists_every_triton_replica_the_autoscaler_may_run(resources):
    from console import DEFAULTS

    statefulset = resources[("StatefulSet", "triton")]
    hpa = resources[("HorizontalPodAutoscaler", "triton")]
    service = resources[("Service", statefulset["spec"]["serviceName"])]
    assert service["spec"]["clusterIP"] == "None"  # headless: one DNS name per ready pod
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": "triton",
    }
    assert hpa["spec"]["minReplicas"] == statefulset["spec"]["replicas"]
    container = next(
        c
        for c in _pod(resources[("Deployment", "console")])["containers"]
        if c["name"] == "console"
    )
    urls = parse_urls(_env(container)[f"{ENV_PREFIX}TRITON_URL"]["value"])
    name, headless = statefulset["metadata"]["name"], service["metadata"]["name"]
    assert urls == tuple(
        f"{name}-{i}.{headless}:{DEFAULT_GRPC_PORT}" for i in range(hpa["spec"]["maxReplicas"])
    )
    assert f"{ENV_PREFIX}TRITON_PROTOCOL" not in _env(container)
    assert DEFAULTS["TRITON_PROTOCOL"] == "grpc"  # so the gRPC port above
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["grpc"] == DEFAULT_GRPC_PORT


def test_console_is_served_through_tls_with_room_for_a_whole_upload(resources):
    from console import DEFAULTS

    ingress = resources[("Ingress", "console")]
    [rule] = ingress["spec"]["rules"]
    [path] = rule["http"]["paths"]
    backend = path["backend"]["service"]
    service = resources[("Service", backend["name"])]
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
    assert service["spec"]["publishNotReadyAddresses"]  # uploads queue while Triton is down
    assert rule["host"] in ingress["spec"]["tls"][0]["hosts"]
    size = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert int(size.removesuffix("m")) * 1024 * 1024 >= DEFAULTS["MAX_CONTENT_LENGTH"]


def test_autoscaler_metric_is_the_one_the_adapter_rule_defines(resources):
    hpa = resources[("HorizontalPodAutoscaler", "triton")]
    [metric] = hpa["spec"]["metrics"]
    [rule] = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


@pytest.mark.integration
def test_probe_paths_and_adapter_series_exist_on_the_real_triton(triton_server, resources):
    [triton] = _pod(resources[("StatefulSet", "triton")])["containers"]
    for probe in ("readinessProbe", "livenessProbe"):
        url = f"http://{triton_server.http_url}{triton[probe]['httpGet']['path']}"
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.status == 200, url
    metrics_url = f"http://localhost:{triton_server.settings.metrics_port}/metrics"
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        exposed = {line.split("{")[0] for line in response.read().decode().splitlines()}
    [rule] = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]
    used = set(re.findall(r"\b(nv_\w+)\{", rule["metricsQuery"] + rule["seriesQuery"]))
    assert used == {"nv_inference_queue_duration_us", "nv_inference_request_success"}
    assert used <= exposed
