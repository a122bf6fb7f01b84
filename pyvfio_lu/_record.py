"""Records: immutable tuples with named fields, like ``collections.namedtuple`` but cheap
to import and to define.

``namedtuple`` imports ``collections`` (and with it ``operator``, ``keyword``, ``reprlib``)
and compiles a ``__new__`` for every class it makes; under an emulated CPU that is tens of
milliseconds of a process's start, which a VMM restarted after a kexec pays while its
guest is paused. A record is the same kind of object (a ``tuple`` subclass: indexing,
unpacking, equality, hashing and pickling as a tuple; ``_fields``, ``_field_defaults``,
``_make``, ``_replace``, ``_asdict``) whose fields are ``itemgetter`` properties and whose
``__new__`` is one shared function. Type checkers see ``typing.NamedTuple`` classes
instead (the modules declare both).
"""

from __future__ import annotations

from _operator import itemgetter as _itemgetter

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers treat it as True)

if TYPE_CHECKING:
    from typing import Any

_tuple_new = tuple.__new__


def _bind(cls: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """``args`` and ``kwargs`` as one value per field, defaults filled in; the TypeError a
    function with the fields as parameters would raise otherwise."""
    fields: tuple[str, ...] = cls._fields
    if len(args) > len(fields):
        raise TypeError(f"{cls.__name__}() takes {len(fields)} positional arguments but {len(args)} were given")
    values = list(args)
    for name in fields[len(args):]:
        if name in kwargs:
            values.append(kwargs.pop(name))
        elif name in cls._field_defaults:
            values.append(cls._field_defaults[name])
        else:
            raise TypeError(f"{cls.__name__}() missing required argument: {name!r}")
    if kwargs:
        name = next(iter(kwargs))
        if name in fields:
            raise TypeError(f"{cls.__name__}() got multiple values for argument {name!r}")
        raise TypeError(f"{cls.__name__}() got an unexpected keyword argument {name!r}")
    return tuple(values)


def _new(cls: Any, *args: Any, **kwargs: Any) -> Any:
    if kwargs or len(args) != len(cls._fields):
        args = _bind(cls, args, kwargs)
    return _tuple_new(cls, args)


def _make(cls: Any, iterable: Any) -> Any:
    values = tuple(iterable)
    if len(values) != len(cls._fields):
        raise TypeError(f"{cls.__name__}._make: expected {len(cls._fields)} values, got {len(values)}")
    return _tuple_new(cls, values)


def _replace(self: Any, /, **changes: Any) -> Any:
    values = [changes.pop(name, value) for name, value in zip(self._fields, self)]
    if changes:
        raise TypeError(f"{type(self).__name__}._replace: unexpected field names {sorted(changes)!r}")
    return _tuple_new(type(self), values)


def _asdict(self: Any) -> dict[str, Any]:
    return dict(zip(self._fields, self))


def _repr(self: Any) -> str:
    return f"{type(self).__name__}(" + ", ".join(f"{n}={v!r}" for n, v in zip(self._fields, self)) + ")"


def _getnewargs(self: Any) -> tuple[Any, ...]:
    return tuple(self)


def record(typename: str, field_names: str, *, defaults: tuple[Any, ...] = (), module: str) -> Any:
    """A tuple subclass named ``typename`` with the space-separated ``field_names``; the last
    ``len(defaults)`` fields take those defaults. ``module`` is the defining module's
    ``__name__`` (for ``repr`` of the class and for pickling)."""
    fields = tuple(field_names.split())
    if len(set(fields)) != len(fields) or not all(f.isidentifier() and not f.startswith("_") for f in fields):
        raise ValueError(f"record {typename}: bad field names {field_names!r}")
    if len(defaults) > len(fields):
        raise TypeError(f"record {typename}: more defaults than fields")
    namespace: dict[str, Any] = {
        "__slots__": (),
        "__module__": module,
        "__doc__": f"{typename}({', '.join(fields)})",
        "_fields": fields,
        "_field_defaults": dict(zip(fields[len(fields) - len(defaults):], defaults)),
        "__match_args__": fields,
        "__new__": _new,
        "_make": classmethod(_make),
        "_replace": _replace,
        "_asdict": _asdict,
        "__repr__": _repr,
        "__getnewargs__": _getnewargs,
    }
    for index, name in enumerate(fields):
        namespace[name] = property(_itemgetter(index), doc=f"Field {index}: {name}")
    return type(typename, (tuple,), namespace)
