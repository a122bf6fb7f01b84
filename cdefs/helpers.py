"""Small C helpers compiled into the same extension.

- ``pvl_ioctl*``: ioctl returning ``-errno`` on failure, so Python needs no separate
  errno look-up and nothing can clobber errno between the call and the check.
- ``pvl_mmio_read{8,16,32,64}`` / ``pvl_mmio_write*``: one volatile load or store of
  exactly that width on a mapped BAR. Slicing a Python ``mmap`` gives no guarantee about
  the access width a device register needs.
- ``pvl_mmap`` / ``pvl_munmap``: map a region of a device fd without the extra ``dup``
  Python's ``mmap`` module makes, so the device file keeps exactly one owner.
- ``pvl_kexec_file_load`` and ``pvl_reboot_kexec``: the in-kernel kexec loader (the only
  one that carries LUO/KHO state) and the reboot into the loaded kernel.
"""

SOURCE = r"""
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/reboot.h>

static long pvl_ioctl(int fd, unsigned long request, void *arg)
{
    long ret = ioctl(fd, request, arg);
    return ret < 0 ? -errno : ret;
}

static long pvl_ioctl_val(int fd, unsigned long request, unsigned long value)
{
    long ret = ioctl(fd, request, value);
    return ret < 0 ? -errno : ret;
}

static uint8_t pvl_mmio_read8(void *base, size_t off)
{ return *(volatile uint8_t *)((char *)base + off); }
static uint16_t pvl_mmio_read16(void *base, size_t off)
{ return *(volatile uint16_t *)((char *)base + off); }
static uint32_t pvl_mmio_read32(void *base, size_t off)
{ return *(volatile uint32_t *)((char *)base + off); }
static uint64_t pvl_mmio_read64(void *base, size_t off)
{ return *(volatile uint64_t *)((char *)base + off); }
static void pvl_mmio_write8(void *base, size_t off, uint8_t v)
{ *(volatile uint8_t *)((char *)base + off) = v; }
static void pvl_mmio_write16(void *base, size_t off, uint16_t v)
{ *(volatile uint16_t *)((char *)base + off) = v; }
static void pvl_mmio_write32(void *base, size_t off, uint32_t v)
{ *(volatile uint32_t *)((char *)base + off) = v; }
static void pvl_mmio_write64(void *base, size_t off, uint64_t v)
{ *(volatile uint64_t *)((char *)base + off) = v; }

static void *pvl_mmap(size_t length, int prot, int flags, int fd, int64_t offset, int *err)
{
    void *p = mmap(NULL, length, prot, flags, fd, (off_t)offset);
    if (p == MAP_FAILED) {
        *err = errno;
        return NULL;
    }
    *err = 0;
    return p;
}

static int pvl_munmap(void *addr, size_t length)
{
    return munmap(addr, length) < 0 ? -errno : 0;
}

static long pvl_kexec_file_load(int kernel_fd, int initrd_fd, const char *cmdline, unsigned long flags)
{
    long ret = syscall(SYS_kexec_file_load, kernel_fd, initrd_fd,
                       (unsigned long)strlen(cmdline) + 1, cmdline, flags);
    return ret < 0 ? -errno : ret;
}

static long pvl_reboot_kexec(void)
{
    long ret = reboot(RB_KEXEC);
    return ret < 0 ? -errno : ret;
}

#define PVL_KEXEC_FILE_UNLOAD 0x00000001
#define PVL_KEXEC_FILE_ON_CRASH 0x00000002
#define PVL_KEXEC_FILE_NO_INITRAMFS 0x00000004
"""

CDEF = r"""
long pvl_ioctl(int fd, unsigned long request, void *arg);
long pvl_ioctl_val(int fd, unsigned long request, unsigned long value);
uint8_t pvl_mmio_read8(void *base, size_t off);
uint16_t pvl_mmio_read16(void *base, size_t off);
uint32_t pvl_mmio_read32(void *base, size_t off);
uint64_t pvl_mmio_read64(void *base, size_t off);
void pvl_mmio_write8(void *base, size_t off, uint8_t v);
void pvl_mmio_write16(void *base, size_t off, uint16_t v);
void pvl_mmio_write32(void *base, size_t off, uint32_t v);
void pvl_mmio_write64(void *base, size_t off, uint64_t v);
void *pvl_mmap(size_t length, int prot, int flags, int fd, int64_t offset, int *err);
int pvl_munmap(void *addr, size_t length);
long pvl_kexec_file_load(int kernel_fd, int initrd_fd, const char *cmdline, unsigned long flags);
long pvl_reboot_kexec(void);
#define PVL_KEXEC_FILE_UNLOAD ...
#define PVL_KEXEC_FILE_ON_CRASH ...
#define PVL_KEXEC_FILE_NO_INITRAMFS ...
"""
