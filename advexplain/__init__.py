"""advexplain: explain why a CNN misclassified an image with inverted adversarial examples.

This folder is the entry-point floor (the `advexplain` command and the process launcher). The
library lives in the repository's `shared/` folder and installs as `advexplain.shared`; the HTTP
services live in `services/` and install as `advexplain.services`.
"""
