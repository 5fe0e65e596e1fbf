"""The paper-style baseline: a Flask app that runs PyTorch eager inside each request.

This is how the paper's web app served its models, and what
``bench_serving.py`` compares Triton against: Flask's development server
(``app.run()``, threaded by default since Flask 1.0, so concurrent requests
share one process and one model), and per request: read the uploaded image,
decode and preprocess it with :mod:`client.preprocess`, run the committed
weights in PyTorch eager (:class:`client.classify.LocalClassifier`, a batch of
one under ``torch.inference_mode``), answer JSON. No batching, no model server,
no lock: each request thread runs its own forward pass.

    python -m benchmarks.naive_server --model resnet18 --port 5200
    curl -F image=@slice.png http://127.0.0.1:5200/predict

    with NaiveServer("resnet18") as server:              # from a benchmark, on a free port
        requests.post(server.url + "/predict", files={"image": ("s.png", data)})
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tempfile

from flask import Flask, jsonify, request

from benchmarks.stack import wait_until_ready
from build_engines.serve import free_ports
from client.classify import LocalClassifier
from client.constants import REPO_ROOT
from client.preprocess import preprocess_bytes
from client.registry import get_model, list_models

logger = logging.getLogger(__name__)

#: The form field that carries the image, as an HTML upload form would name it.
IMAGE_FIELD = "image"


def create_app(model: str) -> Flask:
    """The baseline app: ``POST /predict`` (multipart ``image``) and ``GET /healthz``.

    Args:
        model: Registry name of the fp32 model whose weights PyTorch runs.

    Returns:
        The app, with the model loaded once at start-up.
    """
    spec = get_model(model)
    classifier = LocalClassifier(spec)
    app = Flask(__name__)

    @app.get("/healthz")
    def healthz():
        return jsonify(status="ok", model=spec.name)

    @app.post("/predict")
    def predict():
        upload = request.files[IMAGE_FIELD]
        tensor = preprocess_bytes(upload.read(), upload.filename or "upload.png", spec)
        probability = float(classifier.predict(tensor[None])[0])
        return jsonify(model=spec.name, probability=probability)

    return app


class NaiveServer:
    """The baseline as a real server process on ``host:port``, ready when entered.

    Args:
        model: Registry name of the fp32 model to serve.
        port: TCP port of the development server; a free one by default.
        host: Interface to bind.
        startup_timeout_s: Longest wait for ``/healthz`` (torch import and weights load).

    Raises:
        ServerUnavailableError: (on enter) the process exits or does not answer in time.
    """

    def __init__(
        self,
        model: str,
        port: int | None = None,
        host: str = "127.0.0.1",
        startup_timeout_s: float = 120.0,
    ) -> None:
        if port is None:
            (port,) = free_ports(1)
        self.model = model
        self.url = f"http://{host}:{port}"
        self._command = [
            sys.executable,
            "-m",
            "benchmarks.naive_server",
            f"--model={model}",
            f"--host={host}",
            f"--port={port}",
        ]
        self._startup_timeout_s = startup_timeout_s
        self._process: subprocess.Popen | None = None
        self._log = None

    def __enter__(self) -> NaiveServer:
        logger.info("starting %s", " ".join(self._command))
        self._log = tempfile.TemporaryFile()
        self._process = subprocess.Popen(
            self._command, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT
        )
        try:
            wait_until_ready(
                "naive server",
                self.url + "/healthz",
                self._process,
                self._startup_timeout_s,
                self._log_tail,
            )
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            process.wait(timeout=30)
        if self._log is not None:
            self._log.close()
            self._log = None

    def _log_tail(self, chars: int = 3000) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-chars:]


def main(argv: list[str] | None = None) -> int:
    """Serve one model with Flask's threaded development server until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        required=True,
        choices=[s.name for s in list_models(precision="fp32", runtime="onnxruntime")],
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    create_app(args.model).run(host=args.host, port=args.port, threaded=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
