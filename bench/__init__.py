"""Reproducible benchmarks: each prints a table and writes JSON under bench/results/ (`python -m bench.<name>`).

Every `python -m bench.<name>` imports this package first, so this is where BLAS and OpenMP are
held to one thread (ART, numpy and torch read these when they load): the CPUs are shared, and no
bench module has to import anything in a particular order for it.
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
