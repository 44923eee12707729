"""In-process tests of the explainer's page: GET / and its assets, the headers, what the HTML may and may not hold."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient

from advexplain.services.explainer.app import create_app
from advexplain.services.explainer.settings import ExplainerSettings
from advexplain.shared.explain import DEFAULT_METHOD, METHODS

TOKEN = "test-token-0123456789abcdef"
NASTY = ("<script>alert(1)</script>", 'say "hi" & <b>bye</b>')


class Elements(HTMLParser):
    """Every start tag with its attributes, the text inside <script>/<style> elements, and option texts."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.inline: list[str] = []
        self.options: dict[str, list[tuple[str, str]]] = {}
        self._in: str | None = None
        self._select: str | None = None
        self._option: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if tag in ("script", "style"):
            self._in = tag
        elif tag == "select":
            self._select = attributes.get("id")
            self.options[self._select] = []
        elif tag == "option":
            self._option = attributes.get("value")
            self.options[self._select].append((self._option, ""))

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self._in = None
        elif tag == "option":
            self._option = None

    def handle_data(self, data):
        if self._in is not None and data.strip():
            self.inline.append(data)
        if self._option is not None:
            value, text = self.options[self._select][-1]
            self.options[self._select][-1] = (value, text + data)

    def find(self, tag: str, **attrs) -> list[dict]:
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items())]


def policy(header: str) -> dict[str, list[str]]:
    out = {}
    for directive in header.split(";"):
        name, *values = directive.split()
        out[name] = values
    return out


@pytest.fixture
def settings_for(tiny_models):
    def make(**overrides) -> ExplainerSettings:
        # The black box is never asked: the page only needs the surrogate's classes.
        values = dict(surrogate=[tiny_models["surrogate"]], blackbox_url="http://127.0.0.1:9", device="cpu", threads=1)
        values.update(overrides)
        return ExplainerSettings(**values)

    return make


@pytest.fixture
def client(settings_for):
    with TestClient(create_app(settings_for())) as c:
        yield c


def test_the_page_is_html_with_the_classes_and_methods(client):
    resp = client.get("/")
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "text/html; charset=utf-8"
    page = Elements(resp.text)
    classes = list(client.app.state.explainer.classes)
    assert page.options["label"] == [("", "Choose the true label"), *[(c, c) for c in classes]]
    assert [value for value, _ in page.options["target"]] == ["", *classes]
    assert [value for value, _ in page.options["method"]] == list(METHODS)
    assert ["selected" in a for a in page.find("option", value=DEFAULT_METHOD)] == [True]
    assert page.find("input", id="max_queries", max=str(client.app.state.settings.max_queries))
    assert "$" not in resp.text, "a template placeholder was left unfilled"


def test_the_content_security_policy_is_strict(client):
    for path in ("/", "/static/page.js", "/static/page.css", "/static/favicon.svg"):
        resp = client.get(path)
        assert resp.status_code == 200, path
        csp = policy(resp.headers["content-security-policy"])
        assert csp["default-src"] == ["'self'"]
        assert csp["script-src"] == ["'self'"] and csp["style-src"] == ["'self'"]
        assert csp["connect-src"] == ["'self'"] and csp["img-src"] == ["'self'", "blob:"]
        assert csp["frame-ancestors"] == ["'none'"] and csp["object-src"] == ["'none'"]
        assert csp["base-uri"] == ["'none'"] and csp["form-action"] == ["'self'"]
        values = [v for vs in csp.values() for v in vs]
        assert not [v for v in values if "unsafe" in v or v in ("*", "data:", "http:", "https:") or "://" in v], csp
        assert resp.headers["x-content-type-options"] == "nosniff"
        assert resp.headers["x-frame-options"] == "DENY"
        assert resp.headers["referrer-policy"] == "no-referrer"


def test_no_inline_script_style_or_handler_and_every_asset_is_served_here(client):
    page = Elements(client.get("/").text)
    assert page.inline == [], "inline <script>/<style> would be blocked by the CSP"
    for tag, attrs in page.tags:
        assert "style" not in attrs, f"inline style on <{tag}>"
        assert not [a for a in attrs if a.startswith("on")], f"inline event handler on <{tag}>"
    assets = [a["src"] for a in page.find("script")] + [a["href"] for a in page.find("link")]
    assert sorted(assets) == ["/static/favicon.svg", "/static/page.css", "/static/page.js"]
    for path in assets:
        assert client.get(path).status_code == 200, path


def test_assets_have_their_types_and_nothing_else_is_served(client):
    assert client.get("/static/page.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/static/page.css").headers["content-type"].startswith("text/css")
    assert client.get("/static/favicon.svg").headers["content-type"] == "image/svg+xml"
    for path in ("/static/index.html", "/static/nope.js", "/static/..%2fpage.py", "/static/%2e%2e/app.py",
                 "/static/../page.py", "/static/"):
        resp = client.get(path)
        assert resp.status_code == 404, path
        assert set(resp.json()["error"]) == {"code", "message"}


def test_class_names_are_escaped(settings_for, tiny_models, tmp_path):
    surrogate = tmp_path / "surrogate"
    shutil.copytree(tiny_models["surrogate"], surrogate)
    config = json.loads((surrogate / "config.json").read_text())
    config["classes"] = list(NASTY)
    (surrogate / "config.json").write_text(json.dumps(config))
    with TestClient(create_app(settings_for(surrogate=[surrogate]))) as client:
        text = client.get("/").text
    assert "<script>alert" not in text and "<b>bye" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    page = Elements(text)
    assert page.options["label"][1:] == [(name, name) for name in NASTY]
    assert page.inline == [] and page.find("b") == []


def test_the_white_box_field_shows_only_when_the_route_exists_and_never_posts_itself(settings_for, tiny_models):
    with TestClient(create_app(settings_for())) as client:
        off = Elements(client.get("/").text)
    with TestClient(create_app(settings_for(whitebox_model=tiny_models["blackbox"], whitebox_token=TOKEN))) as client:
        text = client.get("/").text
        on = Elements(text)
    assert "hidden" in off.find("details", id="whitebox")[0]
    assert "hidden" not in on.find("details", id="whitebox")[0]
    field = on.find("input", id="token")[0]
    assert field["type"] == "password" and field["autocomplete"] == "off"
    assert "name" not in field and "value" not in field
    assert TOKEN not in text


def test_every_control_has_a_label(client):
    page = Elements(client.get("/").text)
    labelled = {a["for"] for a in page.find("label")}
    controls = [a["id"] for t, a in page.tags if t in ("input", "select")]
    assert controls and set(controls) <= labelled
    assert page.find("html", lang="en") and page.find("meta", name="viewport")


def test_the_page_is_not_in_the_api_schema(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and not [p for p in paths if p.startswith("/static")]


def test_before_the_models_load_the_page_says_so(settings_for):
    client = TestClient(create_app(settings_for()))  # no `with`: the lifespan has not run
    resp = client.get("/")
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "not_ready"
