"""Deployment commands: ``serve`` (REST service, web page) and ``export`` (ONNX, OpenVINO, TorchScript)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket
from typing import Any

from imgclf.cli import add_config_args, config_from_args, positive_int, user_path
from imgclf.utils import is_loopback, listening_sockets, only_local_hosts

log = logging.getLogger("imgclf")
uvicorn_log = logging.getLogger("uvicorn.error")

# the server runs its own batches (max_batch) on its own runtime (serve_runtime), with no feature cache
SERVE_FIELDS = (
    "serve",
    *(f"features.{name}" for name in ("precision", "device", "workers", "cache_dir", "flip_tta")),
    "data.max_image_pixels",
)


def _serve(args: argparse.Namespace) -> int:
    from imgclf.bundle import Bundle
    from imgclf.serving.app import API_KEY_VARIABLE, create_app, serving_config
    from imgclf.serving.security import http_protocol

    # defaults < the training run's flip_tta and max_image_pixels < --config < flags; $IMGCLF_API_KEY
    given = config_from_args(args)
    host, port = given.serve.host, given.serve.port
    sockets = listening_sockets(host, port)  # held from before the model loads: no second server takes the port
    try:
        bundle = Bundle.load(args.run_dir)
        cfg = serving_config(bundle, given)
        if cfg.serve.api_key is None and not is_loopback(host):
            log.warning(
                "warning: serving on %s without an API key: anyone who can reach port %d can use the model; "
                "give $%s or --api-key",
                host,
                port,
                API_KEY_VARIABLE,
            )
        app = only_local_hosts(create_app(bundle, cfg), host)
        run_server(app, sockets, host, port, "info", http_protocol(cfg.serve.request_timeout_s))
    finally:
        for sock in sockets:
            sock.close()
    return 0


def run_server(
    app: Any, sockets: list[socket.socket], host: str, port: int, log_level: str, http: type[asyncio.Protocol]
) -> None:
    """Serve ``app`` with uvicorn on ``sockets`` (:func:`~imgclf.utils.listening_sockets` of ``host:port``,
    opened before the app's model loaded) until Ctrl-C or SIGTERM."""
    import uvicorn

    class Server(uvicorn.Server):  # uvicorn says where it listens only on sockets it opened itself
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                name = f"[{host}]" if ":" in host else host
                bound = sockets[0].getsockname()[1] if sockets else port  # --port 0: the port the system chose
                uvicorn_log.info("Uvicorn running on http://%s:%d (Press CTRL+C to quit)", name, bound)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=http)
    with contextlib.suppress(KeyboardInterrupt):  # as uvicorn.run: Ctrl-C or SIGTERM is the stop asked for
        Server(config).run(sockets=sockets)


def _export(args: argparse.Namespace) -> int:
    from imgclf.export import export_model

    result = export_model(
        args.run_dir, args.format, args.out, args.precision, args.check_images, args.check_max, args.replace
    )
    p = result.parity
    print(
        f"parity on {p.n_images} images ({p.source}): max |p - p_torch| = {p.max_abs_diff:.2e}, "
        f"top-1 agreement {p.top1_agreement:.1%} (required: {p.criterion})"
    )
    for f in [*result.files, result.sidecar]:
        print(f"wrote {f}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="Serve a trained model over HTTP: REST API, web page, OpenAPI docs.")
    p.add_argument("run_dir", type=user_path, help="Run folder (or its model/ bundle).")
    add_config_args(p, SERVE_FIELDS, from_run=("features.flip_tta", "data.max_image_pixels"))
    p.set_defaults(func=_serve)

    p = sub.add_parser("export", help="Export a trained model as one ONNX, OpenVINO or TorchScript file.")
    p.add_argument("run_dir", type=user_path, help="Run folder (or its model/ bundle).")
    p.add_argument("--format", required=True, choices=["onnx", "openvino", "torchscript"], help="Model file format.")
    p.add_argument(
        "--out",
        type=user_path,
        required=True,
        help="Model file to write (.onnx, .xml + .bin, .pt), or a folder to write it into, named after the run; "
        "a .json sidecar goes beside it.",
    )
    p.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16", "int8"],
        help="fp32 (all formats), bf16 (openvino), int8 (onnx, openvino; needs nncf). [default: fp32]",
    )
    p.add_argument(
        "--check-images",
        type=user_path,
        metavar="DIR",
        help="Images for the parity check (and int8 calibration) [default: the run's test split; fp32: else random images].",
    )
    p.add_argument(
        "--check-max", type=positive_int, default=100, help="Most images used by the parity check. [default: 100]"
    )
    p.add_argument(
        "--replace",
        action="store_true",
        help="Replace the files already at --out (say, this run's export before it was trained again); without "
        "it only an export of the same model is replaced.",
    )
    p.set_defaults(func=_export)
