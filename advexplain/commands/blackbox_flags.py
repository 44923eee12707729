"""Flags shared by the commands that take a black-box URL (`train --distill-from`, `evaluate --blackbox-url`).

Any URL works as in the explainer: an Open Inference Protocol model URL
(`http(s)://host:port/v2/models/<name>[/versions/<v>]`) is asked over OIP, any other over POST
/predict (`advexplain.shared.remote.connect_black_box`). These flags say how an OIP model with FP32
input wants its pixels, like the explainer's EXPLAINER_OIP_PIXEL_SCALE, _MEAN and _STD.
"""

from __future__ import annotations

import argparse
import json
import math

from advexplain.shared.errors import InvalidInput
from advexplain.shared.oip import is_oip_url


def channel_values(text: str) -> tuple[float, ...]:
    """'0.485,0.456,0.406' or a JSON list -> one finite number per channel (1 or 3)."""
    try:
        values = json.loads(text) if text.strip().startswith("[") else [part.strip() for part in text.split(",")]
        numbers = tuple(float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from exc
    if len(numbers) not in (1, 3) or not all(math.isfinite(v) for v in numbers):
        raise argparse.ArgumentTypeError(f"need 1 or 3 finite numbers (one per channel), got {text!r}")
    return numbers


def add_oip_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--oip-pixel-scale", type=float, choices=(1.0, 255.0), default=1.0,
                        help="an OIP black box with FP32 input: 1 sends pixels in [0, 1], 255 in [0, 255]")
    parser.add_argument("--oip-mean", type=channel_values, default=None, metavar="M[,M,M]",
                        help="an OIP black box with FP32 input: per-channel mean subtracted after scaling, in the "
                             "scale's units (with --oip-std)")
    parser.add_argument("--oip-std", type=channel_values, default=None, metavar="S[,S,S]",
                        help="an OIP black box with FP32 input: per-channel std divided by after the mean "
                             "(with --oip-mean)")


def oip_options(args: argparse.Namespace, url: str | None, flag: str) -> dict:
    """The keyword arguments `connect_black_box` takes from the --oip-* flags; refused unless `url` is an OIP URL."""
    options = {"pixel_scale": args.oip_pixel_scale, "mean": args.oip_mean, "std": args.oip_std}
    given = options["pixel_scale"] != 1.0 or options["mean"] is not None or options["std"] is not None
    if given and not (url and is_oip_url(url)):
        raise InvalidInput(f"--oip-pixel-scale, --oip-mean and --oip-std apply to an Open Inference Protocol model "
                           f"URL (http(s)://host:port/v2/models/<name>) given as {flag}; got {url!r}")
    if (options["mean"] is None) != (options["std"] is None):
        raise InvalidInput("give --oip-mean and --oip-std together, or neither")
    return options
