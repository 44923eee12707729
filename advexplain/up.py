"""`make up`: serve the black box and the explainer on loopback, with samples and curl commands.

Starts both services as child processes (the same `advexplain serve` commands an operator runs),
enables the white-box route with a token generated for this run, writes a few images the black box
gets wrong to samples/, prints ready-to-paste curl commands, and stops both on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from advexplain.launch import ServiceProcess


def write_samples(blackbox: Path, out: Path, count: int) -> list[tuple[Path, str]]:
    """Save up to `count` built-in validation photos (at their own size) the black box gets wrong,
    borderline mistakes first, named by true label."""
    import torch

    from advexplain.shared.checkpoints import load_checkpoint
    from advexplain.shared.classifiers import LocalClassifier
    from advexplain.shared.data import load_photos
    from advexplain.shared.evaluation import find_mistakes
    from advexplain.shared.pixels import encode_png

    torch.set_num_threads(1)
    ckpt = load_checkpoint(blackbox)
    box = LocalClassifier(ckpt.model, ckpt.classes)
    photos = load_photos(ckpt.meta.data.get("spec", "elpv"), "validation")
    images = [photos.image(i) for i in range(len(photos))]
    with torch.no_grad():
        probs = [torch.softmax(box.logits(x.unsqueeze(0)), 1)[0] for x in images]
        wrong = find_mistakes(lambda x: int(box.logits(x.unsqueeze(0)).argmax()), images, photos.labels)
    # Borderline mistakes first (the true class nearly won): the clearest demonstrations.
    wrong.sort(key=lambda item: -float(probs[item[0]][photos.labels[item[0]]]))
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("misclassified-*.png"):  # samples of earlier models would mislead
        old.unlink()
    written = []
    for n, (i, _) in enumerate(wrong[:count]):
        label = photos.classes[photos.labels[i]]
        path = out / f"misclassified-{n}-true-{label}.png"
        path.write_bytes(encode_png(images[i]))
        written.append((path, label))
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--blackbox-port", type=int, default=8000)
    parser.add_argument("--explainer-port", type=int, default=8001)
    parser.add_argument("--samples", type=Path, default=Path("samples"))
    args = parser.parse_args()

    token = os.environ.get("EXPLAINER_WHITEBOX_TOKEN") or secrets.token_urlsafe(24)
    env = {"EXPLAINER_WHITEBOX_TOKEN": token, "ADVEXPLAIN_THREADS": os.environ.get("ADVEXPLAIN_THREADS", "1")}
    # Both write to this terminal; in their own sessions, so Ctrl-C reaches this process only, which
    # then stops them in order (explainer first) and waits for their clean shutdown.
    launch = dict(env=env, host=args.host, threads=None, console=True, new_session=True)
    blackbox = ServiceProcess("blackbox", ["--model", str(args.models / "blackbox")], port=args.blackbox_port,
                              **launch)
    explainer = ServiceProcess("explainer", ["--surrogate", str(args.models / "surrogate"),
                                             "--blackbox-url", blackbox.url,
                                             "--whitebox-model", str(args.models / "blackbox")],
                               port=args.explainer_port, **launch)
    services = [blackbox, explainer]
    stopping = []
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))

    def stop(*_):
        for service in reversed(services):
            try:
                service.stop(timeout=10)
            except subprocess.TimeoutExpired:  # stop() has killed it
                pass

    signal.signal(signal.SIGTERM, lambda *_: (stop(), sys.exit(0)))
    blackbox_url, explainer_url = blackbox.url, explainer.url
    try:
        blackbox.start(timeout=60)
        explainer.start(timeout=60)
        samples = write_samples(args.models / "blackbox", args.samples, count=4)
        sample, label = samples[0] if samples else (Path("your-image.png"), "<true label>")
        whitebox_curl = (f"curl -s -H 'Authorization: Bearer {token}' -F image=@{sample} -F label={label} "
                         f"{explainer_url}/internal/whitebox/explain | head -c 600")
        print(
            f"""
advexplain is up
  black box  {blackbox_url}   (POST /predict, GET /healthz, GET /metrics)
  explainer  {explainer_url}   (POST /explain, POST /internal/whitebox/explain, docs at {explainer_url}/docs)
  white-box token for this run: {token}
  {len(samples)} misclassified sample images in {args.samples}/

Explain a misclassification (black box, Algorithm 3 and better):
  curl -s -F image=@{sample} -F label={label} {explainer_url}/explain | python -m json.tool | head -30
Get the panel PNG straight away:
  curl -s -H 'Accept: image/png' -F image=@{sample} -F label={label} {explainer_url}/explain -o panel.png
White box (the real model's gradients; add -F method=paper for the published Algorithm 1):
  {whitebox_curl}
Ask the black box directly:
  curl -s -H 'X-Client-Id: me' -F image=@{sample} {blackbox_url}/predict

Ctrl-C stops both services.""",
            flush=True,
        )
        while all(service.proc.poll() is None for service in services):
            if stopping:
                print("\nstopping both services", flush=True)
                return 0
            time.sleep(0.3)
        print("a service stopped; shutting the other down", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # a service did not come up: say why
        print(f"make up: {exc}", file=sys.stderr)
        return 1
    finally:
        stop()


if __name__ == "__main__":
    sys.exit(main())
