"""`advexplain serve blackbox|explainer`: run one of the HTTP services under uvicorn."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the black box or the explainer over HTTP")
    services = p.add_subparsers(dest="service", required=True, metavar="{blackbox,explainer}")
    _register_blackbox(services)
    _register_explainer(services)


def _settings_or_exit(settings_cls, given: dict):
    """Build settings from the flags that were given; the environment fills the rest. Bad values exit 2."""
    try:
        return settings_cls(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc']) or '(settings)'}: {e['msg']}" for e in exc.errors()]
        print(f"advexplain serve: invalid settings:\n" + "\n".join(lines), file=sys.stderr)
        raise SystemExit(2) from None


def _register_blackbox(services) -> None:
    p = services.add_parser(
        "blackbox", help="the trained CNN behind POST /predict (predictions only, counts every image)",
        description="Every flag can also be set as a BLACKBOX_<FLAG> environment variable (e.g. BLACKBOX_PORT).",
    )
    p.add_argument("--model", type=Path, help="checkpoint folder (default models/blackbox)")
    p.add_argument("--host", help="default 127.0.0.1")
    p.add_argument("--port", type=int, help="default 8000")
    p.add_argument("--output", choices=("proba", "label"), help="'label' answers labels only (default proba)")
    p.add_argument("--protocol", choices=("predict", "oip"),
                   help="'predict': POST /predict (default); 'oip': Open Inference Protocol v2 REST through "
                        "KServe's model server, FP32 NCHW tensors in [0, 1] (needs the kserve extra)")
    p.add_argument("--name", help="the model's name in OIP paths, /v2/models/<name> (default blackbox)")
    p.add_argument("--max-images", type=int, help="files per request, or images per OIP request (default 64)")
    p.add_argument("--max-upload-bytes", type=int, help="request body limit (default 10000000)")
    p.add_argument("--max-pixels", type=int, help="pixels per image, checked before decoding (default 40000000)")
    p.add_argument("--workers", type=int, help="forward passes at once (default 1)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(handler=_serve_blackbox)


def _serve_blackbox(args: argparse.Namespace) -> int:
    from advexplain.services.blackbox.app import create_app
    from advexplain.services.blackbox.settings import BlackboxSettings

    settings = _settings_or_exit(BlackboxSettings, {name: getattr(args, name, None) for name in BlackboxSettings.model_fields})
    if settings.protocol == "oip":
        try:
            from advexplain.services.blackbox.oip import serve_oip
        except ImportError as exc:
            print(f"advexplain serve: --protocol oip needs the kserve extra (pip install 'advexplain[kserve]'): {exc}",
                  file=sys.stderr)
            return 2
        return serve_oip(settings, log_level=args.log_level)
    return _serve(args, BlackboxSettings, create_app, settings)


def _register_explainer(services) -> None:
    p = services.add_parser(
        "explainer", help="explain black-box misclassifications: POST /explain (surrogate gradients, /predict queries)",
        description="Every flag can also be set as an EXPLAINER_<FLAG> environment variable (e.g. EXPLAINER_PORT, "
                    "EXPLAINER_SURROGATE as a comma-separated or JSON list). The white-box route's token is read "
                    "from EXPLAINER_WHITEBOX_TOKEN only; the route is on when it and --whitebox-model are set.",
    )
    p.add_argument("--surrogate", type=Path, action="append",
                   help="surrogate checkpoint folder; repeat for an ensemble (default models/surrogate)")
    p.add_argument("--blackbox-url", help="base URL of the black box (default http://127.0.0.1:8000)")
    p.add_argument("--whitebox-model", type=Path, help="the real model's checkpoint, for /internal/whitebox/explain")
    p.add_argument("--host", help="default 127.0.0.1")
    p.add_argument("--port", type=int, help="default 8001")
    p.add_argument("--client-id", help="X-Client-Id sent to the black box (default advexplain-explainer)")
    p.add_argument("--connect-timeout", type=float, help="seconds to connect to the black box (default 5)")
    p.add_argument("--read-timeout", type=float, help="seconds to wait for one black-box answer (default 30)")
    p.add_argument("--connect-retries", type=int, help="retries of failed connects (default 2)")
    p.add_argument("--max-concurrency", type=int, help="explanations running at once (default 1)")
    p.add_argument("--max-queries", type=int, help="upper limit of a request's max_queries (default 200)")
    p.add_argument("--max-upload-bytes", type=int, help="request body limit (default 10000000)")
    p.add_argument("--max-pixels", type=int, help="pixels of the upload, checked before decoding (default 40000000)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(handler=_serve_explainer)


def _serve_explainer(args: argparse.Namespace) -> int:
    from advexplain.services.explainer.app import create_app
    from advexplain.services.explainer.settings import ExplainerSettings

    return _serve(args, ExplainerSettings, create_app)


def _serve(args: argparse.Namespace, settings_cls, create_app, settings=None) -> int:
    """Settings from the flags that name a field (the environment fills the rest), then uvicorn."""
    import uvicorn

    if settings is None:
        settings = _settings_or_exit(settings_cls, {name: getattr(args, name, None) for name in settings_cls.model_fields})
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level,
                access_log=args.log_level == "debug")
    return 0
