"""`advexplain serve blackbox|explainer`: run one of the HTTP services under uvicorn."""

from __future__ import annotations

import argparse
import os
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
        print("advexplain serve: invalid settings:\n" + "\n".join(lines), file=sys.stderr)
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
    p.add_argument("--max-queue", type=int, help="requests that may wait for a forward pass; one more gets 503 "
                                                 "overloaded with Retry-After (default 64)")
    p.add_argument("--max-queue-wait", type=float, help="seconds a request may wait before it gets 503 overloaded "
                                                        "(default 5)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(handler=_serve_blackbox)


def _serve_blackbox(args: argparse.Namespace) -> int:
    from advexplain.services.blackbox.app import create_app
    from advexplain.services.blackbox.settings import BlackboxSettings

    settings = _settings_or_exit(
        BlackboxSettings, {name: getattr(args, name, None) for name in BlackboxSettings.model_fields}
    )
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
                    "from EXPLAINER_WHITEBOX_TOKEN only; the route is on when it and --whitebox-model are set. "
                    "Torch threads per explanation: `advexplain --threads N serve explainer` or EXPLAINER_THREADS "
                    "(default: the usable cores / (workers x max-concurrency)).",
    )
    p.add_argument("--surrogate", type=Path, action="append",
                   help="surrogate checkpoint folder; repeat for an ensemble (default models/surrogate)")
    p.add_argument("--blackbox-url", help="base URL of the black box (default http://127.0.0.1:8000), or an Open "
                                          "Inference Protocol model URL http(s)://host:port/v2/models/<name>")
    p.add_argument("--oip-pixel-scale", type=float, help="OIP FP32 input: 1 sends pixels in [0, 1] (default), 255 "
                                                         "in [0, 255]")
    p.add_argument("--oip-mean", help="OIP FP32 input: per-channel mean, e.g. 0.485,0.456,0.406 (with --oip-std)")
    p.add_argument("--oip-std", help="OIP FP32 input: per-channel std, e.g. 0.229,0.224,0.225 (with --oip-mean)")
    p.add_argument("--whitebox-model", type=Path, help="the real model's checkpoint, for /internal/whitebox/explain")
    p.add_argument("--host", help="default 127.0.0.1")
    p.add_argument("--port", type=int, help="default 8001")
    p.add_argument("--client-id", help="X-Client-Id sent to the black box (default advexplain-explainer)")
    p.add_argument("--connect-timeout", type=float, help="seconds to connect to the black box (default 5)")
    p.add_argument("--read-timeout", type=float, help="seconds to wait for one black-box answer (default 30)")
    p.add_argument("--connect-retries", type=int, help="retries of failed connects (default 2)")
    p.add_argument("--workers", type=int, help="explainer processes on one port; concurrency, queue and threads "
                                               "are per process (default 1)")
    p.add_argument("--max-concurrency", type=int, help="explanations running at once in each process (default: the "
                                                       "usable cores / workers)")
    p.add_argument("--max-queue", type=int, help="explanations that may wait in each process; one more gets 503 "
                                                 "overloaded with Retry-After at once (default: 4 x max-concurrency)")
    p.add_argument("--max-queue-wait", type=float, help="seconds an explanation may wait before it gets 503 "
                                                        "overloaded (default 10)")
    p.add_argument("--surrogate-batch", type=int, help="most images in one surrogate pass shared by concurrent "
                                                       "explanations; 0 = off (default: 512 on CUDA, 0 on the CPU)")
    p.add_argument("--max-queries", type=int, help="upper limit of a request's max_queries (default 200)")
    p.add_argument("--max-upload-bytes", type=int, help="request body limit (default 10000000)")
    p.add_argument("--max-pixels", type=int, help="pixels of the upload, checked before decoding (default 40000000)")
    p.add_argument("--max-side", type=int, help="uploads with a longer side are downscaled to it once, up front "
                                                 "(default 1024; 0 = never)")
    p.add_argument("--classes", help="class names in index order as the black box labels them, comma-separated "
                                     "(default: the surrogate's)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(handler=_serve_explainer)


def _serve_explainer(args: argparse.Namespace) -> int:
    from advexplain.services.explainer.app import create_app
    from advexplain.services.explainer.settings import ExplainerSettings

    settings = _settings_or_exit(
        ExplainerSettings, {name: getattr(args, name, None) for name in ExplainerSettings.model_fields}
    )
    if settings.workers > 1:
        return _serve_workers(args, settings)
    return _serve(args, ExplainerSettings, create_app, settings)


def _serve_workers(args: argparse.Namespace, settings) -> int:
    """N explainer processes on one port (uvicorn's workers, spawned fresh; they share the listening socket).

    Each worker builds the app from the validated settings (JSON in the environment) and counts its
    metrics into files under one PROMETHEUS_MULTIPROC_DIR, cleared first, so /metrics in any worker
    answers for all of them. This process only supervises: it loads no model.
    """
    import uvicorn

    from advexplain.services.common.metrics import MULTIPROC_ENV, multiprocess_directory
    from advexplain.services.explainer.app import SETTINGS_ENV, settings_to_environment

    os.environ[SETTINGS_ENV] = settings_to_environment(settings)
    with multiprocess_directory(f"explainer-{settings.port}-") as path:
        os.environ[MULTIPROC_ENV] = str(path)
        uvicorn.run("advexplain.services.explainer.app:create_app_from_environment", factory=True,
                    workers=settings.workers, host=settings.host, port=settings.port, log_level=args.log_level,
                    access_log=args.log_level == "debug")
    return 0


def _serve(args: argparse.Namespace, settings_cls, create_app, settings=None) -> int:
    """Settings from the flags that name a field (the environment fills the rest), then uvicorn."""
    import uvicorn

    if settings is None:
        settings = _settings_or_exit(
            settings_cls, {name: getattr(args, name, None) for name in settings_cls.model_fields}
        )
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level,
                access_log=args.log_level == "debug")
    return 0
