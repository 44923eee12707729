"""`serve blackbox --protocol oip --name ...`: the flags, the settings behind them and their checks."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from advexplain.cli import build_parser
from advexplain.services.blackbox.settings import BlackboxSettings


def test_protocol_defaults_to_predict_and_name_to_blackbox(tiny_models):
    settings = BlackboxSettings(model=tiny_models["blackbox"])
    assert (settings.protocol, settings.name) == ("predict", "blackbox")


def test_flags_name_the_settings_fields():
    args = build_parser().parse_args(["serve", "blackbox", "--protocol", "oip", "--name", "resnet-50.v2"])
    assert (args.protocol, args.name) == ("oip", "resnet-50.v2")
    assert {"protocol", "name"} <= set(BlackboxSettings.model_fields)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "blackbox", "--protocol", "grpc"])


def test_environment_selects_oip(tiny_models, monkeypatch):
    monkeypatch.setenv("BLACKBOX_PROTOCOL", "oip")
    monkeypatch.setenv("BLACKBOX_NAME", "box")
    settings = BlackboxSettings(model=tiny_models["blackbox"])
    assert (settings.protocol, settings.name) == ("oip", "box")


@pytest.mark.parametrize("name", ["", "a/b", "../x", "has space", "-dash-first", "x" * 64])
def test_model_names_must_be_safe_in_a_url_path(tiny_models, name):
    with pytest.raises(ValidationError):
        BlackboxSettings(model=tiny_models["blackbox"], name=name)
