"""`advexplain serve blackbox|explainer` (arrives with the services)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the black box or the explainer over HTTP")
    p.set_defaults(handler=_not_yet)


def _not_yet(args) -> int:
    print("advexplain serve arrives with the services")
    return 1
