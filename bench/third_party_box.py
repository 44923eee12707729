"""A classifier advexplain did not train the way it trains its own: the "user's model" for tests and benches.

It differs from our black box in everything the explainer must not assume:
- architecture: a small residual network with global average pooling (no FC stack);
- input geometry: 32x32, reached by resizing the SHORTER side to 36 with Pillow's bicubic filter
  and cropping the centre 32x32 (so the image's borders are never seen, and the aspect ratio is kept);
- preprocessing: ImageNet mean and std, applied in numpy outside the network;
- training split: a seeded random half of the training split (the surrogate gets another 10%),
  with horizontal flips;
- serving: exported to ONNX and run by onnxruntime behind `POST /predict`, label-only, in our JSON
  answer shape, with no `/healthz` and no class list anywhere but the labels it answers.

    python -m bench.third_party_box train --data $ADVEXPLAIN_FACES --out models-thirdparty
    python -m bench.third_party_box serve --model models-thirdparty --port 8100

`GET /stats` reports the images it classified, so tests can compare query counts with its own.
"""


import argparse
import io
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

INPUT_SIZE = 32
RESIZE_SHORTER = 36
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(3, 1, 1)
TRAIN_SHARE = 0.5
TRAIN_SEED = 7


def preprocess(image: Image.Image) -> np.ndarray:
    """Any Pillow image -> float32 (3, 32, 32), the box's own way (shorter side 36, centre crop, ImageNet norm)."""
    rgb = image.convert("RGB")
    w, h = rgb.size
    scale = RESIZE_SHORTER / min(w, h)
    rgb = rgb.resize((max(INPUT_SIZE, round(w * scale)), max(INPUT_SIZE, round(h * scale))), Image.Resampling.BICUBIC)
    w, h = rgb.size
    left, top = (w - INPUT_SIZE) // 2, (h - INPUT_SIZE) // 2
    rgb = rgb.crop((left, top, left + INPUT_SIZE, top + INPUT_SIZE))
    arr = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return (arr - MEAN) / STD


def build_network(classes: int):
    """A small ResNet: stem 24, stages 24/48/96 (stride 2), global average pooling, one linear layer."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
            self.skip = (nn.Identity() if stride == 1 and cin == cout else
                         nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

        def forward(self, x):
            return (self.body(x) + self.skip(x)).relu()

    return nn.Sequential(
        nn.Conv2d(3, 24, 3, 1, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU(inplace=True),
        Block(24, 24, 1), Block(24, 48, 2), Block(48, 96, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(96, classes))


# -- data at the photos' own sizes ---------------------------------------------------------------

def native_split(data: str, split: str) -> tuple[list[Image.Image], list[int], tuple[str, ...], list[str]]:
    """Every image of a split as a Pillow RGB image at its own size, with labels, classes and paths."""
    from advexplain.shared.data import load_photos

    photos = load_photos(data, split)
    images = [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in photos.photos]
    return images, photos.labels, photos.classes, photos.paths


# -- training and export -------------------------------------------------------------------------

def train(data: str, out: Path, *, epochs: int = 12, seed: int = TRAIN_SEED, share: float = TRAIN_SHARE,
          threads: int = 2) -> dict:
    """Train on a seeded `share` of the training split, export ONNX, write box.json; returns the record."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    started = time.perf_counter()
    images, labels, classes, _ = native_split(data, "train")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.permutation(len(images))[: int(round(len(images) * share))])
    x = torch.from_numpy(np.stack([preprocess(images[i]) for i in chosen]))
    y = torch.tensor([labels[i] for i in chosen])
    val_images, val_labels, _, _ = native_split(data, "validation")
    vx = torch.from_numpy(np.stack([preprocess(im) for im in val_images]))
    vy = torch.tensor(val_labels)

    net = build_network(len(classes))
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * ((len(x) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, total_steps=steps)
    for _ in range(epochs):
        net.train()
        order = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            batch = order[i:i + 64]
            xb = x[batch]
            flip = torch.rand(len(batch)) < 0.5
            xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(-1), xb)
            loss = F.cross_entropy(net(xb), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        predicted = torch.cat([net(vx[i:i + 256]).argmax(1) for i in range(0, len(vx), 256)])
    accuracy = float((predicted == vy).float().mean())
    counts = torch.bincount(predicted, minlength=len(classes))
    if int(counts.max()) >= 0.98 * len(vy):
        raise SystemExit(f"the third-party box collapsed to one class ({counts.tolist()}); nothing saved")

    out.mkdir(parents=True, exist_ok=True)
    # The weights too, for evaluation only (benchmarks compute Captum's maps on the same network).
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / "weights.safetensors"))
    torch.onnx.export(net, (torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE),), str(out / "model.onnx"),
                      input_names=["input"], output_names=["logits"], dynamic_shapes=({0: "batch"},),
                      dynamo=True, external_data=False)
    record = {"classes": list(classes), "input_size": INPUT_SIZE, "resize_shorter": RESIZE_SHORTER,
              "data": data, "train_images": len(chosen), "train_share": share, "seed": seed, "epochs": epochs,
              "val_accuracy": accuracy, "val_images": len(vy), "seconds": time.perf_counter() - started}
    (out / "box.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


# -- the box itself ------------------------------------------------------------------------------

@dataclass
class ThirdPartyBox:
    """The ONNX model with its own preprocessing; `classify` counts every image (thread-safe)."""

    session: object
    classes: tuple[str, ...]
    images: int = 0

    @classmethod
    def load(cls, folder: Path) -> "ThirdPartyBox":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        box = cls(session, tuple(json.loads((folder / "box.json").read_text())["classes"]))
        box._lock = threading.Lock()
        return box

    def logits(self, images: list[Image.Image]) -> np.ndarray:
        batch = np.stack([preprocess(im) for im in images]).astype(np.float32)
        return self.session.run(None, {"input": batch})[0]

    def classify(self, images: list[Image.Image]) -> list[int]:
        predicted = self.logits(images).argmax(1).tolist()
        with self._lock:
            self.images += len(images)
        return predicted


def torch_view(folder: Path, height: int, width: int):
    """The box as a differentiable torch module on a (N, 3, height, width) [0, 1] photo, for Captum:
    its preprocessing (shorter side to 36, bicubic; centre crop 32; ImageNet norm) then its network.
    Evaluation only; torch's bicubic resize is close to, not identical with, Pillow's."""
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file

    record = json.loads((folder / "box.json").read_text())
    net = build_network(len(record["classes"]))
    net.load_state_dict(load_file(str(folder / "weights.safetensors")))
    net.eval()
    scale = RESIZE_SHORTER / min(height, width)
    rh, rw = max(INPUT_SIZE, round(height * scale)), max(INPUT_SIZE, round(width * scale))
    top, left = (rh - INPUT_SIZE) // 2, (rw - INPUT_SIZE) // 2
    mean, std = torch.from_numpy(MEAN), torch.from_numpy(STD)

    class View(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            x = F.interpolate(x, size=(rh, rw), mode="bicubic", antialias=True, align_corners=False)
            x = x[:, :, top:top + INPUT_SIZE, left:left + INPUT_SIZE]
            return self.net((x - mean) / std)

    return View().eval()


class LocalThirdPartyBox:
    """The same box in-process as a Classifier (label-only, one-hot rows), for tuning without HTTP.

    x: (N, 3, H, W) float in [0, 1] on the 8-bit grid -> (N, K) one-hot; counts N images.
    """

    def __init__(self, box: ThirdPartyBox):
        self.box = box
        self.classes = box.classes

    @property
    def queries(self) -> int:
        return self.box.images

    def predict_proba(self, x):
        import torch

        arrays = x.detach().cpu().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        predicted = self.box.classify([Image.fromarray(a) for a in arrays])
        return torch.nn.functional.one_hot(torch.tensor(predicted), len(self.classes)).float()


def create_app(folder: Path):
    """POST /predict (multipart `image`, repeated) -> our JSON answer, labels only; GET /stats."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    box = ThirdPartyBox.load(folder)
    app = FastAPI(title="a third-party classifier", openapi_url=None, docs_url=None, redoc_url=None)

    @app.post("/predict")
    async def predict(request: Request):
        form = await request.form()
        files = form.getlist("image")
        if not files:
            return JSONResponse({"error": {"code": "no_image", "message": "send one or more 'image' files"}}, 400)
        try:
            images = [Image.open(io.BytesIO(await f.read())) for f in files]
            for im in images:
                im.load()
        except Exception as exc:  # noqa: BLE001 - a third-party server answers 400 to anything undecodable
            return JSONResponse({"error": {"code": "bad_image", "message": str(exc)}}, 400)
        predicted = box.classify(images)
        return {"predictions": [{"label": box.classes[i], "index": i} for i in predicted], "queries": len(predicted)}

    @app.get("/stats")
    def stats():
        return {"images": box.images}

    return app


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("--data", required=True)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--epochs", type=int, default=12)
    t.add_argument("--seed", type=int, default=TRAIN_SEED)
    t.add_argument("--share", type=float, default=TRAIN_SHARE)
    t.add_argument("--threads", type=int, default=2)
    s = sub.add_parser("serve")
    s.add_argument("--model", type=Path, required=True)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8100)
    args = p.parse_args()
    if args.command == "train":
        print(json.dumps(train(args.data, args.out, epochs=args.epochs, seed=args.seed, share=args.share,
                               threads=args.threads), indent=2))
        return 0
    import uvicorn

    uvicorn.run(create_app(args.model), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
