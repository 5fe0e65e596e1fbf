"""docker-compose.yml and the Dockerfile agree with the repository they deploy.

No Docker engine runs here, so these read the files and check every reference
against the code: profiles, ports, mounts, health checks, the commands' modules,
subcommands and flags, and the install steps against the Makefile's.
"""

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

from client.constants import (
    DEFAULT_CONSOLE_PORT,
    DEFAULT_GRPC_PORT,
    DEFAULT_HTTP_PORT,
    DEFAULT_METRICS_PORT,
    ENV_PREFIX,
    REPO_ROOT,
)
from client.registry import get_model, list_models, series_model_names

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
NGINX_CONF = REPO_ROOT / "deploy" / "nginx.conf"
PROFILES = {
    "gpu": {"engines", "triton", "console", "proxy"},
    "cpu": {"engines-cpu", "triton-cpu", "console-cpu"},
    "openvino": {"engines-cpu", "triton-openvino", "console-openvino"},
    "loadtest": {"locust"},
}
TRITONS = ("triton", "triton-cpu", "triton-openvino")
CONSOLES = {"gpu": "console", "cpu": "console-cpu", "openvino": "console-openvino"}
TRITON_PORTS = {DEFAULT_HTTP_PORT, DEFAULT_GRPC_PORT, DEFAULT_METRICS_PORT}
#: TensorRT inside each NGC release's Triton container (NVIDIA Frameworks Support Matrix):
#: a plan loads only in the TensorRT version that built it.
NGC_TENSORRT = {"24.10": "10.5.0"}
_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict) -> dict[str, dict]:
    return compose["services"]


def _defaults(text: str) -> str:
    """Compose interpolation with every variable unset: ``${X:-d}`` becomes ``d``."""
    return _VARIABLE.sub(lambda m: m.group(2) or "", text)


def _command(service: dict) -> str:
    command = service.get("command", "")
    return _defaults(" ".join(command) if isinstance(command, list) else command)


def _invocations(service: dict, program: list[str]) -> list[list[str]]:
    """Arguments after ``program`` in each ``&&``-joined part of the service's command."""
    found = []
    for part in _command(service).split("&&"):
        words = shlex.split(part)
        for i in range(len(words) - len(program) + 1):
            if words[i : i + len(program)] == program:
                found.append(words[i + len(program) :])
    return found


def _names_in_profile(services: dict[str, dict], profile: str) -> set[str]:
    """Service names and network aliases another container of ``profile`` can resolve."""
    names = set()
    for name, service in services.items():
        if profile in service["profiles"]:
            names.add(name)
            for network in (service.get("networks") or {}).values():
                names.update((network or {}).get("aliases", []))
    return names


def _published(port: str) -> tuple[str, int, int]:
    """(host address, host port, container port) of a short-syntax ``ports`` entry."""
    *host, container = port.split(":")
    address = host[0] if len(host) == 2 else "0.0.0.0"
    return address, int(host[-1]), int(container)


def _mounts(service: dict) -> dict[str, tuple[str, str]]:
    """Container path -> (host source with defaults, mode) of the service's volumes."""
    found = {}
    for volume in service.get("volumes", []):
        source, target, *mode = _defaults(volume).split(":")
        found[target] = (source, mode[0] if mode else "rw")
    return found


def _health_command(service: dict) -> str:
    return " ".join(service["healthcheck"]["test"])


def _requirements(distribution: str, extras: frozenset[str]) -> set[tuple[str, frozenset[str]]]:
    """(name, extras) that ``distribution`` installed with ``extras`` requires here."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found = set()
    for text in requires(distribution) or []:
        requirement = Requirement(text)
        marker = requirement.marker
        if marker is None or any(marker.evaluate({"extra": e}) for e in extras | {""}):
            found.add((canonicalize_name(requirement.name), frozenset(requirement.extras)))
    return found


def test_compose_defines_each_profile_and_no_service_outside_one(services):
    for profile, expected in PROFILES.items():
        assert {n for n, s in services.items() if profile in s.get("profiles", [])} == expected
    # A service without a profile would start with every profile, GPU ones with --profile cpu.
    assert all(s.get("profiles") for s in services.values())


def test_compose_dependencies_stay_inside_their_profile(services):
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert set(services[dependency]["profiles"]) & set(service["profiles"]), (
                f"{name} depends on {dependency} of another profile: an invalid project"
            )


def test_compose_publishes_triton_ports_on_every_triton_to_this_host_only(services):
    for name in TRITONS:
        published = [_published(p) for p in services[name]["ports"]]
        assert {host_port for _, host_port, _ in published} == TRITON_PORTS, name
        assert {address for address, _, _ in published} == {"127.0.0.1"}, name


def test_compose_publishes_nothing_beyond_this_host_but_the_tls_proxy(services):
    for name, service in services.items():
        for port in service.get("ports", []):
            address, host_port, _ = _published(port)
            if name == "proxy":
                assert host_port in (80, 443), port
            else:
                assert address == "127.0.0.1", f"{name} publishes {port} beyond the host"


def test_compose_gpu_console_sits_behind_the_tls_proxy(services):
    from console import DEFAULTS

    console, proxy = services["console"], services["proxy"]
    assert "ports" not in console  # only the compose network reaches it
    assert console["environment"][f"{ENV_PREFIX}TRUSTED_PROXY_HOPS"] == 1
    assert proxy["depends_on"]["console"]["condition"] == "service_healthy"
    mounts = _mounts(proxy)
    assert mounts["/etc/nginx/conf.d/default.conf"] == ("./deploy/nginx.conf", "ro")
    tls_dir, mode = mounts["/etc/nginx/tls"]
    assert mode == "ro" and (REPO_ROOT / tls_dir / ".gitignore").exists()
    conf = NGINX_CONF.read_text()
    assert re.search(r"^\s*listen 443 ssl;", conf, re.M)
    for directive in ("ssl_certificate", "ssl_certificate_key"):
        path = re.search(rf"^\s*{directive} (\S+);", conf, re.M).group(1)
        assert path.startswith("/etc/nginx/tls/"), directive
    assert f"proxy_pass http://console:{DEFAULT_CONSOLE_PORT};" in conf
    # Overwritten, not appended: with one trusted hop the console takes the last address.
    assert "proxy_set_header X-Forwarded-For $remote_addr;" in conf
    body_mib = int(re.search(r"client_max_body_size (\d+)m;", conf).group(1))
    assert body_mib * 1024 * 1024 >= DEFAULTS["MAX_CONTENT_LENGTH"]


def test_tls_material_is_never_committed():
    for name in ("cert.pem", "key.pem"):
        ignored = subprocess.run(["git", "check-ignore", "-q", f"deploy/tls/{name}"], cwd=REPO_ROOT)
        assert ignored.returncode == 0, name


def test_compose_reserves_the_gpu_only_in_the_gpu_profile(services):
    for name, service in services.items():
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {})
        gpu = any("gpu" in d.get("capabilities", []) for d in devices.get("devices", []))
        assert gpu == (name in {"engines", "triton"}), name


def test_compose_bind_mount_sources_exist(compose, services):
    for name, service in services.items():
        for source, _ in _mounts(service).values():
            if source.startswith((".", "/")):
                assert (REPO_ROOT / source).exists(), f"{name}: {source} missing"
            else:
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"


def test_compose_health_checks_probe_triton_ready_and_console_health(services):
    for name in TRITONS:
        assert f"localhost:{DEFAULT_HTTP_PORT}/v2/health/ready" in _health_command(
            services[name]
        ).replace("127.0.0.1", "localhost")
    for name in CONSOLES.values():
        assert f"127.0.0.1:{DEFAULT_CONSOLE_PORT}/healthz" in _health_command(services[name])
    for name, service in services.items():
        for dependency, how in service.get("depends_on", {}).items():
            if how["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits on {dependency}"


def test_compose_hostnames_resolve_within_each_profile(services):
    url_host = re.compile(r"^(?:https?://)?([^:/]+)")
    [locust] = _invocations(services["locust"], ["locust"])
    console_url = next(a.split("=", 1)[1] for a in locust if a.startswith("--host="))
    for profile, console in CONSOLES.items():
        names = _names_in_profile(services, profile)
        triton_url = services[console]["environment"][f"{ENV_PREFIX}TRITON_URL"]
        assert url_host.match(triton_url).group(1) in names, profile
        assert url_host.match(console_url).group(1) in names, profile


def test_compose_console_settings_are_console_config_keys(services):
    from console import DEFAULTS

    for name in CONSOLES.values():
        for key in services[name]["environment"]:
            assert key.removeprefix(ENV_PREFIX) in DEFAULTS, f"{name}: {key}"


def test_compose_builds_stages_of_the_repository_dockerfile(services):
    for name, service in services.items():
        build = service.get("build")
        if build is None:
            continue
        dockerfile = REPO_ROOT / build["context"] / build.get("dockerfile", "Dockerfile")
        assert dockerfile.exists(), name
        assert re.search(rf"^FROM \S+ AS {build['target']}$", dockerfile.read_text(), re.M), name


def test_compose_build_engines_commands_are_registered_with_valid_flags(services):
    from build_engines.commands import add_engine_commands

    parser = argparse.ArgumentParser(prog="python -m build_engines")
    add_engine_commands(parser.add_subparsers(dest="command", required=True))
    calls = [
        args
        for s in services.values()
        for args in _invocations(s, ["python", "-m", "build_engines"])
    ]
    assert {args[0] for args in calls} >= {"export", "quantize", "build-trt", "serve"}
    for args in calls:
        try:
            parser.parse_args(args)
        except SystemExit:
            pytest.fail(f"'python -m build_engines {shlex.join(args)}' does not parse")


def test_compose_console_runs_gunicorn_with_the_repository_config(services):
    for name in CONSOLES.values():
        [args] = _invocations(services[name], ["gunicorn"])
        assert args[0] == "-c" and (REPO_ROOT / args[1]).exists(), name


def test_compose_locust_runs_the_locustfile_headless_with_locust_flags(services):
    [args] = _invocations(services["locust"], ["locust"])
    # In a child: importing locust monkey-patches the standard library with gevent.
    parse = (
        "import json, sys; from locust.argument_parser import get_parser; "
        "o = get_parser(default_config_files=[]).parse_args(sys.argv[1:]); "
        "print(json.dumps([o.headless, o.locustfile]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", parse, *args], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    headless, locustfile = json.loads(result.stdout.splitlines()[-1])
    assert headless
    assert locustfile == "benchmarks/locustfile.py"
    assert (REPO_ROOT / locustfile).exists()


def test_compose_triton_flags_exist_in_triton_of_that_release(services):
    from build_engines.serve import TritonNotInstalledError, find_triton, server_environment

    try:
        binary = find_triton().binary
    except TritonNotInstalledError as e:
        pytest.skip(str(e))
    # nvidia-pytriton's tritonserver is 2.51, the server of NGC 24.10; it prints usage on stderr.
    usage = subprocess.run(
        [str(binary), "--help"],
        capture_output=True,
        text=True,
        env=server_environment(),
        timeout=30,
    ).stderr
    for name in ("triton", "triton-openvino"):
        [args] = _invocations(services[name], ["tritonserver"])
        for flag in (a.split("=")[0] for a in args):
            assert re.search(rf"^  {re.escape(flag)}(\s|$)", usage, re.M), flag


def test_compose_tensorrt_is_the_tensorrt_of_the_triton_release(services):
    image = services["triton"]["image"]
    release = re.fullmatch(r"nvcr\.io/nvidia/tritonserver:(\d\d\.\d\d)-py3", image).group(1)
    version = services["engines"]["build"]["args"]["TENSORRT_VERSION"]
    assert NGC_TENSORRT[release] == version
    default = re.search(r"^ARG TENSORRT_VERSION=(\S+)$", DOCKERFILE.read_text(), re.M).group(1)
    assert default == version


def test_compose_tritons_load_registered_models_of_their_runtime(services):
    for name, runtime in (("triton", "onnxruntime"), ("triton-openvino", "openvino")):
        [args] = _invocations(services[name], ["tritonserver"])
        loaded = {a.split("=", 1)[1] for a in args if a.startswith("--load-model=")}
        expected = {s.name for s in list_models(runtime=runtime)} | set(series_model_names())
        assert loaded == expected, name
    gpu_console = services["console"]["environment"][f"{ENV_PREFIX}MODEL_NAME"]
    assert get_model(gpu_console).runtime == "onnxruntime"  # the TensorRT plan, not the CPU default


def test_dockerfile_installs_like_the_makefile():
    makefile = (REPO_ROOT / "Makefile").read_text()
    dockerfile = DOCKERFILE.read_text()
    editable = re.search(r"pip install (?:--\S+ )*(--no-deps --no-build-isolation -e \.)", makefile)
    stages = re.split(r"^FROM ", dockerfile, flags=re.M)[1:]
    installing = [s for s in stages if "pip install" in s]
    assert {s.split()[2] for s in installing} == {"engines", "console"}
    for stage in installing:
        assert "requirements.lock" in stage and f"pip install {editable.group(1)}" in stage


def test_dockerfile_console_leaves_out_only_what_torch_cuda_needs():
    from packaging.utils import canonicalize_name

    pattern = re.search(r"grep -Pv '([^']+)' requirements\.lock", DOCKERFILE.read_text()).group(1)
    lines = (REPO_ROOT / "requirements.lock").read_text().splitlines()
    dropped = {canonicalize_name(line.split("==")[0]) for line in lines if re.match(pattern, line)}
    seen, todo = set(), [("torch", frozenset())]
    while todo:
        for requirement in _requirements(*todo.pop()) - seen:
            seen.add(requirement)
            todo.append(requirement)
    assert dropped and dropped <= {name for name, _ in seen}
    assert {"nvidia-pytriton", "torch", "torchvision", "tritonclient"}.isdisjoint(dropped)


def test_dockerfile_runs_as_a_user_and_checks_console_health():
    console = re.split(r"^FROM ", DOCKERFILE.read_text(), flags=re.M)[-1]
    assert re.search(r"^USER (?!root)\w+$", console, re.M)
    assert f"EXPOSE {DEFAULT_CONSOLE_PORT}" in console
    assert f"127.0.0.1:{DEFAULT_CONSOLE_PORT}/healthz" in console.split("HEALTHCHECK", 1)[1]


def test_dockerignore_keeps_local_state_out_of_the_image():
    ignored = set((REPO_ROOT / ".dockerignore").read_text().split())
    assert {".venv", ".cache", "instance", "benchmarks/results", "**/__pycache__"} <= ignored


def test_docker_compose_config_is_valid():
    docker = shutil.which("docker")
    if (
        docker is None
        or subprocess.run([docker, "compose", "version"], capture_output=True).returncode
    ):
        pytest.skip("docker compose is not installed")
    profiles = [arg for p in PROFILES for arg in ("--profile", p)]
    result = subprocess.run(
        [docker, "compose", *profiles, "config", "--quiet"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
