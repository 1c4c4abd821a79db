"""vmstate.qemu.gather: pages and records written from where they lie in memory with pwritev,
checked against the bytes a plain concatenation gives, on real files."""

import errno
import os
import subprocess
import sys

import numpy as np

from vmstate.qemu.gather import IOV_MAX, GatherWriter


def _records(count: int, stride: int) -> np.ndarray:
    """`count` records of `stride` bytes, each a distinct 8-byte header then a page."""
    rng = np.random.default_rng(11)
    return rng.integers(0, 256, size=(count, stride), dtype=np.uint8)


def test_a_stream_of_records_between_small_writes(tmp_path):
    records = _records(IOV_MAX + 5, 4104)            # more records than one pwritev takes
    path = tmp_path / "out"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        out = GatherWriter(fd)
        out.write(b"head")
        out.write_records(np.ascontiguousarray(records[:, :8]), records[:, 8:])
        out.write(b"tail")
        size = out.finish()
    finally:
        os.close(fd)
    assert path.read_bytes() == b"head" + records.tobytes() + b"tail"
    assert size == len(path.read_bytes())


CHILD = """
import os, resource, signal, sys
import numpy as np
from vmstate.qemu.gather import GatherWriter
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (10000, 10000))
records = np.arange(4 * 4104, dtype=np.uint32).astype(np.uint8).reshape(4, 4104)
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
try:
    GatherWriter(fd).write_records(np.ascontiguousarray(records[:, :8]), records[:, 8:])
except OSError as e:
    print(e.errno)
"""


def test_a_short_write_goes_on_where_it_stopped(tmp_path):
    """A file size limit makes the kernel write part of the records, then refuse the rest:
    the part is in place and the refusal is raised, not lost."""
    path = tmp_path / "out"
    result = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip() == str(errno.EFBIG)
    records = np.arange(4 * 4104, dtype=np.uint32).astype(np.uint8).reshape(4, 4104)
    assert path.read_bytes() == records.tobytes()[:10000]
