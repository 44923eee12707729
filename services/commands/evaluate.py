"""`advexplain evaluate`: batch explanation of every misclassified image (arrives with the engine)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="explain every misclassified image of a split and write a report")
    p.set_defaults(handler=_not_yet)


def _not_yet(args) -> int:
    print("advexplain evaluate arrives with the explanation engine")
    return 1
