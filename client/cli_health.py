"""``python -m client health``: is the Triton server up, and is every registered model ready?

    python -m client health --url localhost:8000
    python -m client health --url localhost:8001 --protocol grpc
    python -m client health --model mobilenet_v2_openvino_bf16   # a server of one model

Exits 0 when the server is ready and serves every model of the registry (or
each ``--model``), 1 when
it answers but something is not ready, 2 (via the caller) when nothing answers.
Registered by ``client/__main__.py`` through :func:`add_health_command`.
"""

from __future__ import annotations

import argparse
import sys

from client.constants import DEFAULT_HTTP_PORT
from client.registry import list_models, series_model_names
from client.triton_client import PROTOCOLS, server_health


def add_health_command(subparsers) -> None:
    """Add the ``health`` subcommand to ``python -m client``'s subparsers."""
    parser = subparsers.add_parser("health", help="check the Triton server and every model")
    parser.add_argument(
        "--url", default=f"localhost:{DEFAULT_HTTP_PORT}", help="Triton server, host:port"
    )
    parser.add_argument("--protocol", choices=PROTOCOLS, default="http")
    parser.add_argument("--timeout-s", type=float, default=5.0, help="connection timeout")
    parser.add_argument(
        "--model",
        action="append",
        choices=_served_names(),
        help="repeatable; default every registered model and series model",
    )
    parser.set_defaults(run=run_health)


def run_health(args: argparse.Namespace) -> int:
    """Print the server's and each asked-for model's state; return the exit status.

    Raises:
        ServerUnavailableError: nothing answers at ``args.url``.
    """
    health = server_health(args.url, args.protocol, args.timeout_s)
    served = {m.name: m for m in health.models}
    out = sys.stdout
    out.write(
        f"server {health.url} ({health.protocol}) triton {health.version}: "
        f"live={health.live} ready={health.ready}\n"
    )
    all_ready = health.ready
    for name in args.model or _served_names():
        model = served.get(name)
        state = "MISSING" if model is None else model.state
        reason = f"  {model.reason}" if model is not None and model.reason else ""
        out.write(f"  {name:<28} {state}{reason}\n")
        all_ready = all_ready and model is not None and model.ready
    return 0 if all_ready else 1


def _served_names() -> list[str]:
    """Every model a full server loads: the registry's and their series models."""
    return [*(s.name for s in list_models()), *series_model_names()]
