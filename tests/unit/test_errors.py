"""pyvfio_lu.errors: errno -> exception class, messages, builtin bases, pickling."""

from __future__ import annotations

import errno
import os
import pickle

import pytest

from pyvfio_lu import errors as E

# The documented meanings (kernel-contract.md §1.2-1.3, §2-3), written out independently
# of the tables in errors.py.
EXPECTED_BY_ERRNO = {
    errno.EINVAL: E.InvalidArgument,
    errno.E2BIG: E.ArgumentTooLarge,
    errno.ENOTTY: E.NotSupported,
    errno.EOPNOTSUPP: E.NotSupported,
    errno.EPERM: E.PermissionDenied,
    errno.EACCES: E.PermissionDenied,
    errno.EBADF: E.BadFileDescriptor,
    errno.ENOENT: E.NotFound,
    errno.EBUSY: E.Busy,
    errno.EOVERFLOW: E.Overflow,
    errno.EAGAIN: E.TryAgain,
    errno.EFAULT: E.BadAddress,
    errno.ENOSPC: E.NoSpace,
    errno.ENOMEM: E.NoSpace,
    errno.EMFILE: E.FdLimitReached,
    errno.ENFILE: E.FdLimitReached,
}

EXPECTED_BY_OPERATION = {
    ("open /dev/liveupdate", errno.ENOENT): E.LiveUpdateNotEnabled,
    ("open /dev/liveupdate", errno.EBUSY): E.LiveUpdateBusy,
    ("open /dev/liveupdate", errno.EIO): E.IncomingStateFailed,
    ("LIVEUPDATE_IOCTL_CREATE_SESSION", errno.EEXIST): E.SessionExists,
    ("LIVEUPDATE_IOCTL_RETRIEVE_SESSION", errno.ENOENT): E.NoSuchSession,
    ("LIVEUPDATE_IOCTL_RETRIEVE_SESSION", errno.EINVAL): E.SessionAlreadyRetrieved,
    ("LIVEUPDATE_IOCTL_CREATE_SESSION", errno.ENOSPC): E.SessionLimitReached,
    ("LIVEUPDATE_SESSION_PRESERVE_FD", errno.ENOSPC): E.SessionFull,
    ("LIVEUPDATE_SESSION_PRESERVE_FD", errno.EEXIST): E.TokenInUse,
    ("LIVEUPDATE_SESSION_PRESERVE_FD", errno.EBUSY): E.AlreadyPreserved,
    ("LIVEUPDATE_SESSION_PRESERVE_FD", errno.ENOENT): E.NotPreservable,
    ("LIVEUPDATE_SESSION_RETRIEVE_FD", errno.ENOENT): E.NoSuchToken,
    ("LIVEUPDATE_SESSION_FINISH", errno.EBUSY): E.FinishRefused,
    ("ftruncate", errno.EPERM): E.MemfdFrozen,
    ("fallocate", errno.EPERM): E.MemfdFrozen,
    ("write", errno.EPERM): E.MemfdFrozen,
    ("kexec_file_load", errno.EADDRNOTAVAIL): E.KexecImageTooLarge,
    ("kexec_file_load", errno.EPERM): E.KexecNotPermitted,
    ("reboot(RB_KEXEC)", errno.EPERM): E.KexecNotPermitted,
    ("open VFIO device", errno.EBUSY): E.DevicePreserved,
    ("VFIO_GROUP_GET_DEVICE_FD", errno.EBUSY): E.DevicePreserved,
    ("IOMMU_IOAS_MAP", errno.EEXIST): E.MappingExists,
    ("IOMMU_IOAS_MAP_FILE", errno.EEXIST): E.MappingExists,
    ("VFIO_IOMMU_MAP_DMA", errno.EEXIST): E.MappingExists,
}

# class -> the builtin OSError subclass (or other builtin) it must also be
EXPECTED_BUILTIN = {
    E.PermissionDenied: PermissionError,
    E.NotFound: FileNotFoundError,
    E.TryAgain: BlockingIOError,
    E.LiveUpdateNotEnabled: FileNotFoundError,
    E.SessionExists: FileExistsError,
    E.NoSuchSession: FileNotFoundError,
    E.InvalidSessionName: ValueError,
    E.InvalidToken: ValueError,
    E.TokenInUse: FileExistsError,
    E.NoSuchToken: FileNotFoundError,
    E.MemfdFrozen: PermissionError,
    E.SessionClosed: ValueError,
    E.KexecNotPermitted: PermissionError,
    E.LegacyKexecRefused: ValueError,
    E.DevicePreserved: E.Busy,
    E.UnsafeOperation: ValueError,
    E.WrongFdKind: TypeError,
    E.MappingExists: FileExistsError,
    E.BadArgumentType: TypeError,
    E.ArgumentOutOfRange: ValueError,
    E.SessionLimitReached: E.NoSpace,
    E.SessionFull: E.NoSpace,
}


def all_error_classes() -> list[type[E.PyvfioError]]:
    seen, todo = [], [E.PyvfioError]
    while todo:
        cls = todo.pop()
        if cls not in seen and cls.__module__ == E.__name__:
            seen.append(cls)
            todo.extend(cls.__subclasses__())
    return sorted(seen, key=lambda c: c.__name__)


def test_errno_table_is_the_documented_one():
    assert E.BY_ERRNO == EXPECTED_BY_ERRNO


def test_operation_table_is_the_documented_one():
    assert E.BY_OPERATION == EXPECTED_BY_OPERATION


@pytest.mark.parametrize("err", sorted(EXPECTED_BY_ERRNO), ids=lambda e: errno.errorcode[e])
def test_error_for_an_unlisted_operation_uses_the_errno_class(err):
    exc = E.error_for(err, "SOME_IOCTL", "/dev/thing")
    assert type(exc) is EXPECTED_BY_ERRNO[err]
    assert exc.errno == err


@pytest.mark.parametrize("key", sorted(EXPECTED_BY_OPERATION), ids=lambda k: f"{k[0]}-{errno.errorcode[k[1]]}")
def test_error_for_a_documented_operation_uses_its_specific_class(key):
    operation, err = key
    exc = E.error_for(err, operation, "the-target")
    assert type(exc) is EXPECTED_BY_OPERATION[key]
    assert exc.errno == err and exc.operation == operation and exc.target == "the-target"


def test_error_for_an_unknown_errno_is_the_base_class():
    exc = E.error_for(errno.EXDEV, "SOME_IOCTL", "x")
    assert type(exc) is E.PyvfioError
    assert exc.errno == errno.EXDEV


@pytest.mark.parametrize("key", sorted(EXPECTED_BY_OPERATION), ids=lambda k: f"{k[0]}-{errno.errorcode[k[1]]}")
def test_message_names_operation_target_and_errno_symbol(key):
    operation, err = key
    msg = str(E.error_for(err, operation, "session 'vm-1'"))
    assert msg.startswith(f"{operation} on session 'vm-1': ")
    assert msg.endswith(f"[{errno.errorcode[err]}]")


def test_message_of_a_generic_error_carries_strerror():
    msg = str(E.error_for(errno.ENOTTY, "VFIO_DEVICE_GET_INFO", "/dev/null"))
    assert msg == f"VFIO_DEVICE_GET_INFO on /dev/null: {os.strerror(errno.ENOTTY)} [ENOTTY]"


def test_message_without_target_or_errno():
    exc = E.WrongFdKind(None, "VFIO_IOMMU_GET_INFO", "", "wrong fd")
    assert str(exc) == "VFIO_IOMMU_GET_INFO: wrong fd [no errno]"
    assert exc.errno is None


def test_the_documented_example_message():
    exc = E.error_for(errno.EEXIST, "LIVEUPDATE_IOCTL_CREATE_SESSION", "/dev/liveupdate (session 'vm-1')")
    assert str(exc) == ("LIVEUPDATE_IOCTL_CREATE_SESSION on /dev/liveupdate (session 'vm-1'): "
                        "a session with this name already exists [EEXIST]")


@pytest.mark.parametrize("cls", all_error_classes(), ids=lambda c: c.__name__)
def test_every_class_is_an_oserror_with_errno_and_strerror_pinned(cls):
    exc = cls(errno.EINVAL, "op", "target", "the reason")
    assert isinstance(exc, OSError) and isinstance(exc, E.PyvfioError)
    assert exc.errno == errno.EINVAL
    assert exc.strerror == "the reason" == exc.reason
    assert exc.filename is None


@pytest.mark.parametrize("cls", sorted(EXPECTED_BUILTIN, key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_class_is_also_its_builtin_subclass(cls):
    exc = cls(errno.EINVAL, "op", "t")
    assert isinstance(exc, EXPECTED_BUILTIN[cls])
    with pytest.raises(EXPECTED_BUILTIN[cls]):
        raise exc


@pytest.mark.parametrize("cls", all_error_classes(), ids=lambda c: c.__name__)
def test_pickle_round_trip_keeps_class_and_attributes(cls):
    exc = cls(errno.EBUSY, "LIVEUPDATE_SESSION_PRESERVE_FD", "session 'a' (token 0x1)", "why")
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is cls
    assert (back.errno, back.operation, back.target, back.reason) == (exc.errno, exc.operation, exc.target, exc.reason)
    assert str(back) == str(exc)


def test_pickle_round_trip_keeps_default_reason_and_no_errno():
    back = pickle.loads(pickle.dumps(E.SessionClosed(None, "session", "session 'x'")))
    assert back.errno is None
    assert back.reason == E.SessionClosed.default_reason


def test_default_reason_replaces_strerror():
    exc = E.error_for(errno.ENOENT, "LIVEUPDATE_SESSION_RETRIEVE_FD", "session 'a' (token 0x7)")
    assert exc.reason == E.NoSuchToken.default_reason
    assert exc.strerror == exc.reason


def test_explicit_reason_wins_over_default():
    exc = E.error_for(errno.EEXIST, "LIVEUPDATE_IOCTL_CREATE_SESSION", "t", "custom words")
    assert exc.reason == "custom words"
    assert "custom words" in str(exc)


def test_live_update_busy_carries_holders():
    exc = E.error_for(errno.EBUSY, "open /dev/liveupdate", "/dev/liveupdate", holders=[12, 34])
    assert type(exc) is E.LiveUpdateBusy
    assert exc.holders == (12, 34)


def test_live_update_busy_without_holders_has_empty_tuple():
    assert E.LiveUpdateBusy(errno.EBUSY, "open /dev/liveupdate").holders == ()


def test_live_update_busy_keeps_holders_through_pickle():
    exc = E.LiveUpdateBusy(errno.EBUSY, "open /dev/liveupdate", "/dev/liveupdate", "held", holders=(12, 34))
    back = pickle.loads(pickle.dumps(exc))
    assert back.holders == (12, 34)


@pytest.mark.parametrize("err", [errno.EBUSY, errno.EINVAL, errno.ENOENT, errno.EIO, errno.ENOMEM])
def test_reboot_kexec_failure_is_kexec_refused(err):
    exc = E.error_for(err, "reboot(RB_KEXEC)", "kexec")
    assert type(exc) is E.KexecRefused
    assert exc.errno == err


def test_reboot_kexec_eperm_is_not_permitted():
    assert type(E.error_for(errno.EPERM, "reboot(RB_KEXEC)")) is E.KexecNotPermitted


@pytest.mark.parametrize("err", [errno.EINVAL, errno.ENOEXEC, errno.ENOMEM, errno.EBUSY, errno.EIO])
def test_kexec_file_load_generic_failure_is_a_kexec_error(err):
    exc = E.error_for(err, "kexec_file_load", "/boot/vmlinuz")
    assert type(exc) is E.KexecError
    assert exc.errno == err


def test_kexec_file_load_documented_failures_keep_their_class():
    assert type(E.error_for(errno.EADDRNOTAVAIL, "kexec_file_load")) is E.KexecImageTooLarge
    assert type(E.error_for(errno.EPERM, "kexec_file_load")) is E.KexecNotPermitted


def test_vfio_preservation_unsupported_is_not_preservable():
    assert issubclass(E.VfioPreservationUnsupported, E.NotPreservable)
    assert issubclass(E.DevicePreserved, E.VfioError)


@pytest.mark.parametrize("operation", ["VFIO_DEVICE_GET_INFO", "VFIO_DEVICE_BIND_IOMMUFD", "read region 7 at 0x4",
                                       "write region 0 at 0x0", "mmap region 0"])
def test_eio_on_a_device_fd_is_device_frozen(operation):
    exc = E.error_for(errno.EIO, operation, "0000:00:04.0")
    assert type(exc) is E.DeviceFrozen and "recover" in str(exc)
    assert type(E.error_for(errno.EIO, "open /dev/liveupdate")) is E.IncomingStateFailed
    assert type(E.error_for(errno.EIO, "IOMMU_IOAS_MAP")) is E.PyvfioError
