"""vmstate.record: a record class behaves like the same fields under @dataclass(frozen=True)."""

import dataclasses

import pytest

from vmstate.record import record


def declare(decorator):
    class Entry:
        kind: str
        fd: int = 3
        offsets: tuple = ()
        notes: list = dataclasses.field(default_factory=list)
    return decorator(Entry)


RECORD, DATACLASS = declare(record), declare(dataclasses.dataclass(frozen=True))
CALLS = [(("file",), {}), (("file", 4), {}), (("pipe",), {"offsets": (1, 2)}),
         ((), {"kind": "stdin", "fd": 0}), (("a", 1, (2,), [3]), {})]
BAD_CALLS = [((), {}), (("a", 1, (), [], 5), {}), (("a",), {"kind": "b"}),
             (("a",), {"colour": 1})]


@pytest.mark.parametrize(("args", "kwargs"), CALLS)
def test_a_record_is_built_compared_and_shown_as_a_frozen_dataclass(args, kwargs):
    mine, theirs = RECORD(*args, **kwargs), DATACLASS(*args, **kwargs)
    assert dataclasses.astuple(mine) == dataclasses.astuple(theirs)
    assert repr(mine) == repr(theirs).replace(DATACLASS.__qualname__, RECORD.__qualname__)
    assert mine == RECORD(*args, **kwargs) and mine != theirs
    assert mine != dataclasses.replace(mine, fd=mine.fd + 1)
    assert dataclasses.replace(mine, fd=9).fd == 9 and dataclasses.replace(mine).kind == mine.kind
    assert [f.name for f in dataclasses.fields(mine)] == ["kind", "fd", "offsets", "notes"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        mine.fd = 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        del mine.kind


def test_equal_records_hash_alike_and_factories_make_new_values():
    @record
    class Point:
        x: int
        y: int = 0
    assert hash(Point(1, 2)) == hash(Point(1, y=2)) == hash((1, 2)) and Point(1) in {Point(1, 0)}
    assert RECORD("file").notes is not RECORD("file").notes


@pytest.mark.parametrize(("args", "kwargs"), BAD_CALLS)
def test_bad_arguments_raise_type_error_as_for_a_dataclass(args, kwargs):
    with pytest.raises(TypeError):
        DATACLASS(*args, **kwargs)
    with pytest.raises(TypeError):
        RECORD(*args, **kwargs)


def test_a_record_keeps_its_docstring_or_gets_one_naming_its_fields():
    @record
    class Described:
        """What it holds."""
        x: int
    assert Described.__doc__ == "What it holds."
    assert RECORD.__doc__ == "Entry(kind, fd, offsets, notes)"
