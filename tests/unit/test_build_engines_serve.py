"""The embedded server's command line, environment and settings (no server started)."""

import os
import sysconfig

import pytest

from build_engines.serve import (
    EmbeddedTriton,
    ServeSettings,
    ensure_python_stub,
    find_triton,
    server_command,
    server_environment,
)
from client.errors import ModelNotReadyError


def test_environment_puts_this_libpython_first_and_site_packages_on_path():
    env = server_environment({"LD_LIBRARY_PATH": "/opt/other", "PATH": "/usr/bin"})
    assert env["LD_LIBRARY_PATH"].split(os.pathsep)[0] == sysconfig.get_config_var("LIBDIR")
    assert env["LD_LIBRARY_PATH"].endswith("/opt/other")
    assert sysconfig.get_paths()["purelib"] in env["PYTHONPATH"].split(os.pathsep)


def test_command_uses_wheel_backends_cpu_configs_and_every_model():
    install = find_triton()
    settings = ServeSettings(http_port=9000, grpc_port=9001, metrics_port=9002)
    command = server_command(install, settings)
    assert command[0] == str(install.binary)
    assert f"--backend-directory={install.backends}" in command
    assert "--model-config-name=cpu" in command
    assert "--http-port=9000" in command and "--grpc-port=9001" in command
    assert {c for c in command if c.startswith("--load-model=")} == {
        f"--load-model={m}" for m in settings.models
    }


def test_python_stub_is_installed_beside_the_backend():
    install = find_triton()
    assert ensure_python_stub(install) == install.stub
    assert install.stub.exists()


def test_settings_come_from_env_then_overrides(monkeypatch):
    monkeypatch.setenv("HEMOTRIAGE_HTTP_PORT", "9100")
    monkeypatch.setenv("HEMOTRIAGE_GRPC_PORT", "9101")
    settings = ServeSettings.from_env(grpc_port=9200, metrics_port=None)
    assert (settings.http_port, settings.grpc_port, settings.metrics_port) == (9100, 9200, 8002)


@pytest.mark.parametrize(
    "kwargs", [{"http_port": 8001}, {"http_port": 0}, {"models": ()}, {"startup_timeout_s": 0}]
)
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        ServeSettings(**kwargs)


def test_unbuilt_repository_is_refused_before_starting(tmp_path):
    (tmp_path / "resnet18" / "1").mkdir(parents=True)
    settings = ServeSettings(repository=tmp_path, models=("resnet18",))
    with pytest.raises(ModelNotReadyError, match="build_engines export"):
        EmbeddedTriton(settings).start()
