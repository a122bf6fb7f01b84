"""Wrong types and out-of-range values at the public entry points that need no kernel device:
a named error (a PyvfioError that is also the matching builtin: TypeError / ValueError), and
nothing created (no fd left open: the suite's fd check proves it)."""

from __future__ import annotations

import pytest

from pyvfio_lu import errors
from pyvfio_lu.fd import fileno_of
from pyvfio_lu.iommu import DmaBuffer
from pyvfio_lu.luo import check_token, encode_name
from pyvfio_lu.memfd import Memfd

CASES = {
    "Memfd.create(5)": (lambda: Memfd.create(5), errors.BadArgumentType),
    "Memfd.create(name with NUL)": (lambda: Memfd.create("a\0b"), errors.BadArgumentType),
    "Memfd.create(data=str)": (lambda: Memfd.create("x", "text"), errors.BadArgumentType),
    "Memfd.create(size=-1)": (lambda: Memfd.create("x", size=-1), errors.ArgumentOutOfRange),
    "Memfd.create(size='1')": (lambda: Memfd.create("x", size="1"), errors.BadArgumentType),
    "Memfd.create(size=2**64)": (lambda: Memfd.create("x", size=2**64), errors.ArgumentOutOfRange),
    "DmaBuffer('4096')": (lambda: DmaBuffer("4096"), errors.BadArgumentType),
    "DmaBuffer(-4096)": (lambda: DmaBuffer(-4096), errors.ArgumentOutOfRange),
    "DmaBuffer(2**70)": (lambda: DmaBuffer(2**70), errors.ArgumentOutOfRange),
    "DmaBuffer(100)": (lambda: DmaBuffer(100), errors.InvalidArgument),
    "fileno_of('3')": (lambda: fileno_of("3"), errors.BadArgumentType),
    "fileno_of(True)": (lambda: fileno_of(True), errors.BadArgumentType),
    "fileno_of(-1)": (lambda: fileno_of(-1), errors.ArgumentOutOfRange),
    "fileno_of(2**40)": (lambda: fileno_of(2**40), errors.ArgumentOutOfRange),
    "encode_name(5)": (lambda: encode_name(5), errors.InvalidSessionName),
    "encode_name('')": (lambda: encode_name(""), errors.InvalidSessionName),
    "encode_name(64 bytes)": (lambda: encode_name("x" * 64), errors.InvalidSessionName),
    "check_token(-1)": (lambda: check_token(-1), errors.InvalidToken),
    "check_token(2**64)": (lambda: check_token(2**64), errors.InvalidToken),
    "check_token('1')": (lambda: check_token("1"), errors.InvalidToken),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_named_error_and_nothing_created(case):
    call, expected = CASES[case]
    with pytest.raises(expected) as exc:
        call()
    assert isinstance(exc.value, errors.PyvfioError)
    assert isinstance(exc.value, (TypeError, ValueError)) or expected is errors.InvalidArgument
