"""``imgclf ui DATA_DIR [--run RUN_DIR] [--port 8001]``: the review web app."""

from __future__ import annotations

import argparse
import json
import secrets
import socket
from pathlib import Path

from imgclf.cli import add_config_args, host_name, port_number, user_path, utf8_path
from imgclf.utils import listening_sockets, only_local_hosts

HEADER_TIMEOUT_S = 30.0  # a request's headers arrive within this, or its connection is closed

# the analysis fits the linear SVM head whatever a run's classifier: only its settings are offered
UI_SECTIONS = (
    *("backbone", "features", "data.max_image_pixels"),
    *(f"classifier.{name}" for name in ("l2_normalize", "svm_c_grid", "cv_folds", "class_weight")),
)


def _ui(args: argparse.Namespace) -> int:
    sockets = listening_sockets(args.host, args.port)  # held from before the model loads
    try:
        return _serve_ui(args, sockets)
    finally:
        for sock in sockets:
            sock.close()


def _serve_ui(args: argparse.Namespace, sockets: list[socket.socket]) -> int:
    from imgclf.backbones import BackboneError
    from imgclf.bundle import Bundle
    from imgclf.config import AUTO_BACKBONE, Config
    from imgclf.serving.cli import run_server
    from imgclf.serving.security import http_protocol
    from imgclf.ui.app import create_app

    backbone = None
    base = Config()
    if args.run:
        config_file = Path(args.run) / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} not found: give a run folder written by `imgclf train`")
        base = Config.of_run(json.loads(config_file.read_text(encoding="utf-8")), str(config_file))
    if args.config:
        base = Config.from_file(args.config, base)
    if args.run:
        bundle = Bundle.load(args.run)
        if bundle.backbone_state is not None:  # fine-tuned: score with the run's own features
            backbone = bundle.build_backbone()
    flat = {k.removeprefix("cfg__"): v for k, v in vars(args).items() if k.startswith("cfg__")}
    cfg = base.updated(**flat, data_root=Path(args.data_dir))
    if cfg.backbone.backbone == AUTO_BACKBONE and backbone is None:
        raise BackboneError(
            "the review app takes a backbone name, not auto (which train chooses by cross-validation): give "
            "--backbone NAME (e.g. efficientnet_lite0) or --run a run folder, whose backbone it uses"
        )
    app = create_app(
        Path(args.data_dir),
        Path(args.run) if args.run else None,
        cfg,
        backbone=backbone,
        analyse_on_start=args.analysis,
        token=(token := secrets.token_urlsafe(24)),
    )
    host = f"[{args.host}]" if ":" in args.host else args.host  # an IPv6 address in a URL
    print(f"imgclf review app: http://{host}:{args.port}/?token={token}")
    run_server(
        only_local_hosts(app, args.host), sockets, args.host, args.port, "warning", http_protocol(HEADER_TIMEOUT_S)
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="Review web app: browse, relabel (undoable), results, label errors, labelling.")
    p.add_argument(
        "data_dir", type=utf8_path, help="Data folder: one sub-folder per class, optional unlabeled/ sub-folder."
    )
    p.add_argument(
        "--run",
        type=user_path,
        metavar="RUN_DIR",
        help="Run folder whose results to show; its settings replace the defaults shown below.",
    )
    p.add_argument(
        "--host",
        type=host_name,
        default="127.0.0.1",
        help="Address to listen on (0.0.0.0 for all). [default: 127.0.0.1]",
    )
    p.add_argument("--port", type=port_number, default=8001, help="Port to listen on. [default: 8001]")
    p.add_argument(
        "--analysis",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Compute label-error and active-learning scores in the background at start. [default: on]",
    )
    add_config_args(p, UI_SECTIONS)
    p.set_defaults(func=_ui)
