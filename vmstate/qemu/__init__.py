"""QEMU migration streams (QEMU 7.2, x86-64 pc and q35): reading, writing, split and join."""

import os

# numpy's OpenBLAS would start a thread per core at import, and those threads spin for a
# while: CPU taken from split and join, which use no BLAS (a user's own setting is kept).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
