"""Headless Chromium for the page tests, and the README's screenshot of the real page (docs/page.png).

    .venv/bin/python tests/browser/page_browser.py --models models --out docs/page.png

starts a black box and an explainer on loopback from the checkpoints in `--models` (as `make up`
trains them), explains a validation image the black box gets wrong through the page itself, and
saves a screenshot of the whole page. The browser is Debian's `chromium` (/usr/bin/chromium, or
ADVEXPLAIN_CHROMIUM) driven by Playwright's Python API; Playwright's own browser download is never used.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
from pathlib import Path

import httpx

CHROMIUM = Path(os.environ.get("ADVEXPLAIN_CHROMIUM", "/usr/bin/chromium"))
# Playwright adds --headless; no GPU, no sandbox (CI runs as root), and nothing that phones home: the
# tests must work offline.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--no-first-run", "--no-default-browser-check",
    "--metrics-recording-only", "--password-store=basic",
]


PHONE = {"width": 375, "height": 812}
DESKTOP = {"width": 1024, "height": 900}


def launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)


def misclassified_pngs(blackbox_path: Path, count: int) -> list[tuple[bytes, str]]:
    """(PNG bytes, true class name) of elpv validation images the black box gets wrong."""
    import torch
    from PIL import Image

    from advexplain.shared.classifiers import LocalClassifier
    from advexplain.shared.data import load_images

    clf = LocalClassifier.from_checkpoint(blackbox_path)
    images = load_images("elpv", "validation", clf.image_size, progress=False)
    with torch.no_grad():
        predicted = clf.logits(images.as_float()).argmax(1)
    out = []
    for i in (predicted != images.labels).nonzero().flatten()[:count].tolist():
        buf = io.BytesIO()
        Image.fromarray(images.images[i].permute(1, 2, 0).numpy()).save(buf, format="PNG")
        out.append((buf.getvalue(), images.classes[int(images.labels[i])]))
    return out


def explained_case(explainer_url: str, cases: list[tuple[bytes, str]]) -> tuple[bytes, str] | None:
    """The first case the explainer explains successfully over plain HTTP, or None. The search is
    deterministic, so the page gets the same answer for it."""
    for png, label in cases:
        answer = httpx.post(f"{explainer_url}/explain", files={"image": ("x.png", png, "image/png")},
                            data={"label": label}, timeout=60)
        answer.raise_for_status()
        if answer.json()["success"] and not answer.json()["already_correct"]:
            return png, label
    return None


def main(argv: list[str] | None = None) -> int:
    from playwright.sync_api import sync_playwright

    from advexplain.launch import ServiceProcess

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path("models"), help="folder with blackbox/ and surrogate/")
    parser.add_argument("--out", type=Path, default=Path("docs/page.png"))
    parser.add_argument("--width", type=int, default=900)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        blackbox = ServiceProcess("blackbox", ["--model", str(args.models / "blackbox")], log_dir=Path(tmp)).start()
        explainer = None
        try:
            explainer = ServiceProcess("explainer", ["--surrogate", str(args.models / "surrogate"),
                                                     "--blackbox-url", blackbox.url], log_dir=Path(tmp)).start()
            cases = misclassified_pngs(args.models / "blackbox", 12)
            png, label = explained_case(explainer.url, cases) or cases[0]
            image = Path(tmp) / "misclassified.png"
            image.write_bytes(png)
            with sync_playwright() as p:
                browser = launch_chromium(p)
                page = browser.new_page(viewport={"width": args.width, "height": 900}, device_scale_factor=1)
                page.goto(explainer.url + "/")
                page.set_input_files("#image", str(image))
                page.select_option("#label", label)
                page.click("#submit")
                page.wait_for_selector("#result:not([hidden])", timeout=60_000)
                page.wait_for_function("document.getElementById('panel').complete")
                args.out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out), full_page=True)
                browser.close()
        finally:
            if explainer is not None:
                explainer.stop()
            blackbox.stop()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
