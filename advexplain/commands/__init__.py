"""Sub-commands of the `advexplain` CLI, one module each, each with `register(subparsers)`."""
