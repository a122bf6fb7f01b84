#!/bin/sh
# /init of the pyvfio-lu test initramfs, run by busybox sh as PID 1.
#
# Builds a writable root from the host's root (9p, read-only) under a tmpfs overlay,
# mounts the per-run results share at /shared, and runs `/bin/sh /shared/run.sh <stage>`
# chrooted into it, <stage> coming from `pyvfio_lu.stage=N` on the kernel command line.
# Lines starting with "pyvfio-lu: " are markers the host parses (pyvfio_lu/vm/qemu.py):
# keep their wording in step with it.
export PATH=/bin

say() { echo "pyvfio-lu: $*"; }

halt_now() {
    sync
    say "poweroff"
    poweroff -f
    sleep 10
}

fail() {
    say "init failed: $*"
    halt_now
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

stage=1
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        pyvfio_lu.stage=*) stage="${arg#pyvfio_lu.stage=}" ;;
    esac
done
say "init stage=$stage"

mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /lower \
    || fail "cannot mount the host root (9p tag hostroot)"
mount -t tmpfs -o mode=0755 tmpfs /rw || fail "cannot mount the overlay's tmpfs"
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot \
    || fail "cannot mount the overlay root"

mount --move /proc /newroot/proc || fail "cannot move /proc"
mount --move /sys /newroot/sys || fail "cannot move /sys"
mount --move /dev /newroot/dev || fail "cannot move /dev"
mkdir -p /newroot/shared /newroot/dev/pts /newroot/dev/shm
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 shared /newroot/shared \
    || fail "cannot mount the results share (9p tag shared)"
mount -t debugfs debugfs /newroot/sys/kernel/debug || say "warning: no debugfs"
mount -t devpts devpts /newroot/dev/pts || say "warning: no devpts"
mount -t tmpfs -o mode=1777 tmpfs /newroot/dev/shm || say "warning: no /dev/shm"

ip link set lo up
# The optional NIC is QEMU user networking with restrict=on: a fixed address and a route
# for tests that need one; no packet ever leaves the host.
if ip link show eth0 >/dev/null 2>&1; then
    ip link set eth0 up
    ip addr add 10.0.2.15/24 dev eth0
    ip route add default via 10.0.2.2 dev eth0
fi

say "stage $stage begin"
env -i PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/root TERM=dumb LANG=C.UTF-8 \
    chroot /newroot /bin/sh /shared/run.sh "$stage"
rc=$?
say "stage $stage end rc=$rc"
halt_now
