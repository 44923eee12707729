"""The explainer's page for people: `GET /` (the form, with the classes rendered in) and its static assets.

Plain HTML, CSS and JavaScript files shipped in the package (no build step, no CDN, no inline script
or style), served with a strict Content-Security-Policy. The page talks to the same `/explain` and
`/internal/whitebox/explain` routes as curl does; the white-box token lives only in a password field.
"""

from __future__ import annotations

import html
from functools import cache
from importlib import resources
from string import Template

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, Response

from advexplain.services.common.errors import ServiceNotReady
from advexplain.shared.explain import DEFAULT_ALPHA, DEFAULT_MAX_QUERIES, DEFAULT_METHOD, METHODS
from advexplain.shared.saliency import DEFAULT_BETA, DEFAULT_TAU

page_router = APIRouter(include_in_schema=False)

# Only what the page needs: its own scripts, styles and images (result PNGs become blob: URLs), fetch
# to its own origin, no frames, no plugins, no <base> rewriting, forms posting back here only.
CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' blob:",
    "connect-src 'self'",
    "font-src 'none'",
    "object-src 'none'",
    "media-src 'none'",
    "worker-src 'none'",
    "frame-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
))
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
    # Small files: revalidate every time, so a new release is never mixed with a cached old script.
    "Cache-Control": "no-cache",
}

# The files served under /static/, by name; anything else is a 404 (no path is ever joined from a request).
ASSETS = {
    "page.css": "text/css; charset=utf-8",
    "page.js": "text/javascript; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}

# Plain words for the methods a person picks from; a method without a line here shows its name only.
METHOD_WORDS = {
    "margin": "smallest overall change",
    "margin-linf": "smallest largest per-pixel change",
    "paper": "the paper's line search",
}


@cache
def read_static(name: str) -> bytes:
    return resources.files("advexplain.services.explainer").joinpath("static", name).read_bytes()


def options(values, selected: str | None = None) -> str:
    """<option> elements for `values` (value, text) pairs, every string HTML-escaped."""
    out = []
    for value, text in values:
        chosen = " selected" if value == selected else ""
        out.append(f'<option value="{html.escape(value, quote=True)}"{chosen}>{html.escape(text)}</option>')
    return "\n".join(out)


def method_text(name: str) -> str:
    words = METHOD_WORDS.get(name)
    text = f"{name}: {words}" if words else name
    return f"{text} (default)" if name == DEFAULT_METHOD else text


def render_page(classes: tuple[str, ...], *, max_queries_limit: int, whitebox: bool) -> str:
    """The page with the class list, methods and limits filled in; every value is escaped."""
    class_pairs = [(name, name) for name in classes]
    template = Template(read_static("index.html").decode("utf-8"))
    return template.substitute(
        label_options=options([("", "Choose the true label"), *class_pairs], selected=""),
        target_options=options([("", "Same as the true label"), *class_pairs], selected=""),
        method_options=options([(name, method_text(name)) for name in METHODS], selected=DEFAULT_METHOD),
        saliency_options=options([("", "The method's default (detail; change for paper)"),
                                  ("detail", "detail: the photo's detail the change works against"),
                                  ("change", "change: the change itself (the paper's map)")], selected=""),
        max_queries_default=DEFAULT_MAX_QUERIES,
        max_queries_limit=max_queries_limit,
        tau_default=DEFAULT_TAU,
        beta_default=DEFAULT_BETA,
        alpha_default=DEFAULT_ALPHA,
        whitebox_hidden="" if whitebox else " hidden",
    )


@page_router.get("/", response_class=HTMLResponse)
def page(request: Request) -> HTMLResponse:
    explainer = getattr(request.app.state, "explainer", None)
    if explainer is None:
        raise ServiceNotReady("the surrogate is not loaded yet")
    settings = request.app.state.settings
    body = render_page(tuple(explainer.classes), max_queries_limit=settings.max_queries,
                       whitebox=settings.whitebox_enabled)
    return HTMLResponse(body, headers=SECURITY_HEADERS)


@page_router.get("/static/{name}")
def asset(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:
        # The app's handler answers this with the one error body (code not_found).
        raise HTTPException(404, "no such file")
    return Response(read_static(name), media_type=media_type, headers=SECURITY_HEADERS)
