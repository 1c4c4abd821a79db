"""vmstate.qemu.gather: page records written with pwritev from pages read out of another
file, checked against the bytes a plain concatenation gives, on real files."""

import errno
import os
import struct
import subprocess
import sys

import pytest

from vmstate.qemu import layout
from vmstate.qemu.gather import RECORDS_PER_CALL, GatherWriter

FLAGS = layout.RAM_PAGE | layout.RAM_CONTINUE


def pages_in_a_file(path, count: int, offset: int) -> bytes:
    """`count` distinct pages back to back in a new file at `path` from `offset`."""
    data = b"".join(bytes([i % 251]) * 7 + os.urandom(layout.PAGE_SIZE - 7)
                    for i in range(count))
    path.write_bytes(bytes(offset) + data)
    return data


def records(first_page: int, data: bytes) -> bytes:
    pages = [data[i:i + layout.PAGE_SIZE] for i in range(0, len(data), layout.PAGE_SIZE)]
    return b"".join(struct.pack(">Q", (first_page + i) * layout.PAGE_SIZE | FLAGS) + page
                    for i, page in enumerate(pages))


def test_page_records_between_small_writes(tmp_path):
    count = RECORDS_PER_CALL + 5                        # more records than one pwritev takes
    data = pages_in_a_file(tmp_path / "in", count, 5 * layout.PAGE_SIZE)
    path = tmp_path / "out"
    source = os.open(tmp_path / "in", os.O_RDONLY)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        out = GatherWriter(fd)
        out.write(b"head")
        out.write_page_records(3 * layout.PAGE_SIZE | FLAGS, source, 5 * layout.PAGE_SIZE, count)
        out.write(b"tail")
        size = out.finish()
    finally:
        os.close(fd)
        os.close(source)
    assert path.read_bytes() == b"head" + records(3, data) + b"tail"
    assert size == len(path.read_bytes())


CHILD = """
import os, resource, signal, sys
from vmstate.qemu.gather import GatherWriter
with open(sys.argv[1] + ".in", "wb") as f:
    f.write(bytes(range(256)) * 64)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (10000, 10000))
source = os.open(sys.argv[1] + ".in", os.O_RDONLY)
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
try:
    GatherWriter(fd).write_page_records(0x28, source, 0, 4)
except OSError as e:
    print(e.errno)
"""


def test_a_source_that_ends_early_is_an_eof_error(tmp_path):
    pages_in_a_file(tmp_path / "in", 2, 0)
    source = os.open(tmp_path / "in", os.O_RDONLY)
    fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises(EOFError, match="0x3000"):
            GatherWriter(fd).write_page_records(FLAGS, source, 0, 3)
    finally:
        os.close(fd)
        os.close(source)


def test_a_short_write_goes_on_where_it_stopped(tmp_path):
    """A file size limit makes the kernel write part of the records, then refuse the rest:
    the part is in place and the refusal is raised, not lost."""
    path = tmp_path / "out"
    result = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip() == str(errno.EFBIG)
    page = bytes(range(256)) * 16
    expected = b"".join(struct.pack(">Q", i * layout.PAGE_SIZE | 0x28) + page for i in range(4))
    assert path.read_bytes() == expected[:10000]
