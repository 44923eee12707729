"""The compose file and Dockerfiles, checked statically: everything they name exists and agrees.

No Docker engine runs in CI, so these tests read the files: every path, port, environment
variable, volume, network, healthcheck and command must match the code and the settings classes.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from advexplain.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]


def settings_fields() -> dict[str, set[str]]:
    from advexplain.services.blackbox.settings import BlackboxSettings
    from advexplain.services.explainer.settings import ExplainerSettings

    return {
        "BLACKBOX_": {name.upper() for name in BlackboxSettings.model_fields},
        "EXPLAINER_": {name.upper() for name in ExplainerSettings.model_fields},
    }


OTHER_ENV = {"ADVEXPLAIN_THREADS", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "PIP_NO_CACHE_DIR",
             "PIP_DISABLE_PIP_VERSION_CHECK"}


def parse_dockerfile(path: Path) -> dict:
    """Instructions of a Dockerfile, continuation lines joined: {'FROM': [...], 'ENV': {...}, ...}."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    out: dict = {"ENV": {}, "COPY": [], "EXPOSE": [], "RUN": []}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "ENV":
            for token in shlex.split(rest):
                key, _, value = token.partition("=")
                out["ENV"][key] = value
        elif op in ("COPY", "EXPOSE", "RUN"):
            out[op].append(rest)
        else:
            out[op] = rest
    return out


DOCKERFILES = {
    name: parse_dockerfile(ROOT / SERVICES[name]["build"]["dockerfile"]) for name in ("blackbox", "explainer")
}


def compose_env(service: str) -> dict[str, str]:
    env = SERVICES[service].get("environment", {})
    return {k: str(v) for k, v in env.items()}


def test_every_build_file_exists():
    for name, service in SERVICES.items():
        build = service["build"]
        assert (ROOT / build["context"] / build["dockerfile"]).is_file(), name


@pytest.mark.parametrize("service", ["blackbox", "explainer"])
def test_every_environment_variable_is_a_setting(service):
    fields = settings_fields()
    names = set(compose_env(service)) | set(DOCKERFILES[service]["ENV"])
    names |= {line.partition("=")[0] for line in (ROOT / ".env.example").read_text().splitlines()
              if line and not line.startswith("#")} if service == "explainer" else set()
    for name in names:
        if name in OTHER_ENV:
            continue
        prefix = next((p for p in fields if name.startswith(p)), None)
        assert prefix is not None, f"{name} belongs to no settings class"
        assert name.removeprefix(prefix) in fields[prefix], f"{name} is not a field of the {prefix}* settings"


@pytest.mark.parametrize("service, port", [("blackbox", "8000"), ("explainer", "8001")])
def test_ports_agree(service, port):
    prefix = service.upper() + "_"
    dockerfile = DOCKERFILES[service]
    assert dockerfile["ENV"][prefix + "PORT"] == port
    assert compose_env(service)[prefix + "PORT"] == port
    assert dockerfile["EXPOSE"] == [port]
    assert f"127.0.0.1:{port}/healthz" in dockerfile["HEALTHCHECK"]
    assert dockerfile["ENV"][prefix + "HOST"] == "0.0.0.0", "a container must listen beyond its loopback"


def test_only_the_explainer_is_published_and_the_black_box_is_private():
    published = {name for name, s in SERVICES.items() if s.get("ports")}
    assert published == {"explainer"}
    assert SERVICES["explainer"]["ports"] == ["8001:8001"]
    assert COMPOSE["networks"]["internal"]["internal"] is True
    assert SERVICES["blackbox"]["networks"] == ["internal"]
    for name, service in SERVICES.items():
        for network in service.get("networks", []):
            assert network in COMPOSE["networks"], f"{name} joins undeclared network {network}"


def test_explainer_reaches_the_black_box_by_service_name():
    url = compose_env("explainer")["EXPLAINER_BLACKBOX_URL"]
    assert url == f"http://blackbox:{compose_env('blackbox')['BLACKBOX_PORT']}"
    assert DOCKERFILES["explainer"]["ENV"]["EXPLAINER_BLACKBOX_URL"] == url


def test_start_order_and_healthchecks():
    assert SERVICES["explainer"]["depends_on"] == {"blackbox": {"condition": "service_healthy"}}
    assert SERVICES["blackbox"]["depends_on"] == {"train": {"condition": "service_completed_successfully"}}
    for name in ("blackbox", "explainer"):
        assert "HEALTHCHECK" in DOCKERFILES[name], f"{name} needs a HEALTHCHECK for depends_on"
    assert SERVICES["train"]["restart"] == "no"


def test_models_live_in_a_declared_volume():
    assert "models" in COMPOSE["volumes"]
    mounts = {name: s.get("volumes", []) for name, s in SERVICES.items()}
    assert mounts["train"] == ["models:/models"], "train writes the models"
    assert mounts["blackbox"] == ["models:/models:ro"] and mounts["explainer"] == ["models:/models:ro"]
    paths = [compose_env("blackbox")["BLACKBOX_MODEL"], compose_env("explainer")["EXPLAINER_SURROGATE"],
             compose_env("explainer")["EXPLAINER_WHITEBOX_MODEL"], DOCKERFILES["blackbox"]["ENV"]["BLACKBOX_MODEL"],
             DOCKERFILES["explainer"]["ENV"]["EXPLAINER_SURROGATE"]]
    train_cmd = SERVICES["train"]["command"][-1]
    for path in paths:
        assert path.startswith("/models/")
        assert f"--out {path}" in train_cmd, f"nothing trains {path}"


def test_token_comes_from_an_env_file_not_the_compose_file():
    assert SERVICES["explainer"]["env_file"] == [{"path": ".env", "required": False}]
    assert "EXPLAINER_WHITEBOX_TOKEN" not in compose_env("explainer")
    assert "EXPLAINER_WHITEBOX_TOKEN=" in (ROOT / ".env.example").read_text()
    assert ".env" in (ROOT / ".dockerignore").read_text().split()


@pytest.mark.parametrize("service", ["blackbox", "explainer"])
def test_dockerfile_is_slim_non_root_and_copies_what_exists(service):
    dockerfile = DOCKERFILES[service]
    assert dockerfile["FROM"] == "python:3.11-slim"
    assert dockerfile["USER"] not in ("", "root", "0")
    for copy in dockerfile["COPY"]:
        *sources, _dest = copy.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source} does not exist"
    cmd = json.loads(dockerfile["CMD"])
    assert cmd[0] == "advexplain"
    args = build_parser().parse_args(cmd[1:])
    assert args.command == "serve" and args.service == service


def test_train_command_parses_with_the_cli():
    train_cmd = SERVICES["train"]["command"][-1]
    commands = re.findall(r"advexplain (train [^)&|]+)", train_cmd)
    assert len(commands) == 2
    for command in commands:
        args = build_parser().parse_args(shlex.split(command))
        assert args.command == "train" and args.kind in ("blackbox", "surrogate")


def test_make_compose_and_kserve_train_the_same_default_models():
    """`make up`, compose and the KServe job train the built-in models alike: the surrogate with
    --no-augment (chosen for elpv; see README, Training), the black box as the paper does."""
    sources = {
        "Makefile": (ROOT / "Makefile").read_text().replace("$(BIN)/", "").replace("$(MODELS)", "/models"),
        "compose": SERVICES["train"]["command"][-1],
        "kserve": (ROOT / "deploy" / "kserve" / "20-train-job.yaml").read_text(),
    }
    trained = {}
    for name, text in sources.items():
        commands = [build_parser().parse_args(shlex.split(c))
                    for c in re.findall(r"advexplain (train (?:blackbox|surrogate)[^)&|\n]*)", text)]
        trained[name] = sorted((a.kind, a.augment, a.data, a.fraction, a.seed, str(a.out)) for a in commands)
        assert [kind for kind, *_ in trained[name]] == ["blackbox", "surrogate"], name
    assert trained["Makefile"] == trained["compose"] == trained["kserve"]
    by_kind = {kind: augment for kind, augment, *_ in trained["Makefile"]}
    assert by_kind == {"blackbox": None, "surrogate": False}


def test_dockerignore_keeps_data_and_models_out():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "models", "tests", "bench"} <= ignored
