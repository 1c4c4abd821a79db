"""Frozen data classes that cost little to create.

`dataclasses.dataclass(frozen=True)` writes six methods per class (__init__, __repr__,
__eq__, __hash__, __setattr__, __delattr__) as source text and compiles each one: about
0.4 ms a class here, 9 ms of every command's start-up for the VM state's twenty classes
(vmstate.state). `record` makes the same kind of class from methods written once, here,
that read the class's fields when called. The class is a dataclass all the same
(dataclasses.fields, replace, astuple and asdict work on it); it behaves like a frozen one:
the same constructor arguments and defaults, equality and hash over the fields in order, the
same repr, and assigning or deleting a field raises dataclasses.FrozenInstanceError. An
instance costs a few microseconds more to construct."""

from __future__ import annotations

from dataclasses import MISSING, FrozenInstanceError, dataclass, fields


def record(cls: type) -> type:
    """`cls` (fields declared as for @dataclass) made a frozen dataclass with shared methods."""
    if cls.__doc__ is None:     # else dataclass derives one from a signature (tokenize: ~1 ms)
        cls.__doc__ = f"{cls.__name__}({', '.join(cls.__dict__.get('__annotations__', ()))})"
    cls = dataclass(init=False, repr=False, eq=False)(cls)     # fields only: no code written
    cls._record_fields = tuple((f.name, f.default, f.default_factory) for f in fields(cls))
    cls._record_names = tuple(name for name, _, _ in cls._record_fields)
    cls.__init__, cls.__repr__ = _init, _repr
    cls.__eq__, cls.__hash__ = _eq, _hash
    cls.__setattr__, cls.__delattr__ = _refuse_assignment, _refuse_deletion
    return cls


def _init(self, *args, **kwargs) -> None:
    cls = type(self)
    if len(args) > len(cls._record_fields):
        raise TypeError(f"{cls.__name__}() takes {len(cls._record_fields)} positional "
                        f"arguments but {len(args)} were given")
    for name, value in zip(cls._record_names, args):
        object.__setattr__(self, name, value)
    for name, default, factory in cls._record_fields[len(args):]:
        if name in kwargs:
            value = kwargs.pop(name)
        elif default is not MISSING:
            value = default
        elif factory is not MISSING:
            value = factory()
        else:
            raise TypeError(f"{cls.__name__}() missing required argument: '{name}'")
        object.__setattr__(self, name, value)
    for name in kwargs:
        reason = ("got multiple values for argument" if name in cls._record_names
                  else "got an unexpected keyword argument")
        raise TypeError(f"{cls.__name__}() {reason} '{name}'")


def _values(self) -> tuple:
    return tuple(getattr(self, name) for name in self._record_names)


def _repr(self) -> str:
    inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._record_names)
    return f"{type(self).__qualname__}({inner})"


def _eq(self, other):
    if other.__class__ is not self.__class__:
        return NotImplemented
    return _values(self) == _values(other)


def _hash(self) -> int:
    return hash(_values(self))


def _refuse_assignment(self, name: str, value) -> None:
    raise FrozenInstanceError(f"cannot assign to field {name!r}")


def _refuse_deletion(self, name: str) -> None:
    raise FrozenInstanceError(f"cannot delete field {name!r}")
