"""vmstate.qemu.records: runs of page records read in bulk, on real files of records built
here, checked against a record-by-record reading of the same bytes."""

import os
import struct

import pytest

from vmstate.qemu import layout
from vmstate.qemu.records import FIRST_READ, RECORDS_PER_READ, RecordStaging, read_run

PAGE = layout.RAM_PAGE | layout.RAM_CONTINUE
ZERO = layout.RAM_ZERO | layout.RAM_CONTINUE


def page_record(page: int, kind: int = PAGE, fill: int = 0) -> bytes:
    header = struct.pack(">Q", page * layout.PAGE_SIZE | kind)
    if kind == ZERO:
        return header + bytes([fill])
    return header + bytes([page % 251]) * layout.PAGE_SIZE


def read(tmp_path, records: bytes, first_header: int, limit: int, zero_fill=None):
    path = tmp_path / "records"
    path.write_bytes(records)
    staging = RecordStaging(1 if zero_fill is not None else layout.PAGE_SIZE)
    stretches = []

    def sink(index, payloads, count):
        stretches.append((index, bytes(payloads[:count * layout.PAGE_SIZE])))

    fd = os.open(path, os.O_RDONLY)
    try:
        found = read_run(fd, staging, 0, first_header, limit, zero_fill,
                         None if zero_fill is not None else sink)
    finally:
        os.close(fd)
        staging.close()
    return found, stretches


@pytest.mark.parametrize("length", [1, FIRST_READ, FIRST_READ + 1, RECORDS_PER_READ + 3,
                                    3 * RECORDS_PER_READ])
def test_a_page_run_is_read_whole_and_its_pages_given_in_order(tmp_path, length):
    records = b"".join(page_record(100 + i) for i in range(length))
    found, stretches = read(tmp_path, records + page_record(7), 100 * 4096 | PAGE, 10**6)
    assert found == length
    assert [index for index, _ in stretches] == sorted(index for index, _ in stretches)
    assert b"".join(data for _, data in stretches) == b"".join(
        bytes([(100 + i) % 251]) * layout.PAGE_SIZE for i in range(length))


@pytest.mark.parametrize("breaker", ["zero record", "skipped page", "other flags", "truncated"])
def test_a_page_run_ends_at_the_first_record_that_does_not_continue_it(tmp_path, breaker):
    length = RECORDS_PER_READ + FIRST_READ + 5
    records = [page_record(i) for i in range(length)]
    records[length - 3] = {"zero record": page_record(length - 3, ZERO),
                           "skipped page": page_record(length + 10),
                           "other flags": struct.pack(">Q", (length - 3) * 4096 | 0x08)
                           + bytes(4096),
                           "truncated": page_record(length - 3)[:100]}[breaker]
    data = b"".join(records[:length - 2] if breaker == "truncated" else records)
    found, stretches = read(tmp_path, data, PAGE, 10**6)
    assert found == length - 3
    assert sum(len(page) for _, page in stretches) == found * layout.PAGE_SIZE


def test_a_run_stops_at_the_block_limit(tmp_path):
    records = b"".join(page_record(i) for i in range(40))
    found, _ = read(tmp_path, records, PAGE, 33)
    assert found == 33


def test_a_zero_run_ends_where_the_fill_byte_changes(tmp_path):
    records = b"".join(page_record(i, ZERO, 0) for i in range(1000))
    records += page_record(1000, ZERO, 0x5A) + page_record(1001, ZERO, 0)
    found, _ = read(tmp_path, records, ZERO, 10**6, zero_fill=0)
    assert found == 1000


def test_the_bytes_read_past_a_short_run_stay_below_its_own(tmp_path, monkeypatch):
    """A run of one record in a long stream reads FIRST_READ records, not a whole slot."""
    counts = []
    original = RecordStaging.read
    monkeypatch.setattr(RecordStaging, "read", lambda self, fd, offset, count:
                        counts.append(count) or original(self, fd, offset, count))
    records = page_record(0) + b"".join(page_record(5 + i) for i in range(2000))
    found, _ = read(tmp_path, records, PAGE, 10**6)
    assert found == 1
    assert counts == [FIRST_READ]
