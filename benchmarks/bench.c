/*
 * The C side of pyvfio-lu's benchmarks: the same kernel calls the Python side makes
 * through pyvfio_lu, written the way a small C program would make them.
 *
 * Built in the guest by benchmarks/cprog.py with the host's gcc, against pvl_uapi.h:
 * the project's own declarations (cdefs/liveupdate.py, vfio.py, iommufd.py), not the
 * machine's kernel headers.
 *
 * Every timed loop prints one JSON line on stdout:
 *   {"bench": NAME, "iters": N, "ns": [total ns of repeat 1, repeat 2, ...]}
 * Times are CLOCK_MONOTONIC, the clock behind Python's time.perf_counter_ns().
 *
 *   bench device CDEV ITERS_IOCTL ITERS_MMIO REPEATS
 *       VFIO_DEVICE_GET_INFO; BAR0 read32 at 0 and write32 at 4 (volatile, exact width);
 *       a poll of the id register that matches at once (ITERS_IOCTL times)
 *   bench getname ITERS REPEATS
 *       LIVEUPDATE_SESSION_GET_NAME on a fresh outgoing session
 *   bench dma CDEV TOTAL_BYTES PIECE_BYTES ROUNDS IOVA
 *       IOMMU_IOAS_MAP of TOTAL in PIECE-sized pieces, then IOMMU_IOAS_UNMAP of each
 *   bench lu-preserve SESSION FILES
 *       create SESSION, preserve FILES memfds; then fork a holder that keeps it open
 *   bench lu-retrieve SESSION FILES
 *       retrieve SESSION, retrieve and verify every memfd, finish
 *   bench blackout SESSION RAM_BYTES IOVA [device]
 *       after a kexec: retrieve SESSION, re-map its guest RAM and (with "device") bind its
 *       device to a new iommufd and DMA once (the blackout; benchmarks/blackout.py's twin)
 *   bench pipe-ioctl ITERS REPEATS
 *       calibration, needs no device: FIONREAD on a pipe (runs on the host too)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include "pvl_uapi.h"

#define MAX_REPEATS 64
#define MEMFD_SIZE 4096

static void die(const char *what)
{
    fprintf(stderr, "bench: %s: %s\n", what, strerror(errno));
    exit(1);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void report(const char *bench, long iters, const uint64_t *ns, int repeats)
{
    printf("{\"bench\": \"%s\", \"iters\": %ld, \"ns\": [", bench, iters);
    for (int r = 0; r < repeats; r++)
        printf("%s%llu", r ? ", " : "", (unsigned long long)ns[r]);
    printf("]}\n");
    fflush(stdout);
}

/* a device fd bound to a new iommufd (VFIO_DEVICE_BIND_IOMMUFD) and attached to a new IOAS */
static void bind_and_attach(int dev, int *iommufd_out, uint32_t *ioas_out)
{
    int iommufd = open("/dev/iommu", O_RDWR | O_CLOEXEC);
    if (iommufd < 0)
        die("/dev/iommu");
    struct vfio_device_bind_iommufd bind = { .argsz = sizeof(bind), .iommufd = iommufd };
    if (ioctl(dev, VFIO_DEVICE_BIND_IOMMUFD, &bind) < 0)
        die("VFIO_DEVICE_BIND_IOMMUFD");
    struct iommu_ioas_alloc alloc = { .size = sizeof(alloc) };
    if (ioctl(iommufd, IOMMU_IOAS_ALLOC, &alloc) < 0)
        die("IOMMU_IOAS_ALLOC");
    struct vfio_device_attach_iommufd_pt attach = { .argsz = sizeof(attach), .pt_id = alloc.out_ioas_id };
    if (ioctl(dev, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &attach) < 0)
        die("VFIO_DEVICE_ATTACH_IOMMUFD_PT");
    *iommufd_out = iommufd;
    *ioas_out = alloc.out_ioas_id;
}

/* cdev + iommufd: open, VFIO_DEVICE_BIND_IOMMUFD, IOMMU_IOAS_ALLOC, attach to the IOAS */
static int open_device(const char *cdev, int *iommufd_out, uint32_t *ioas_out)
{
    int dev = open(cdev, O_RDWR | O_CLOEXEC);
    if (dev < 0)
        die(cdev);
    bind_and_attach(dev, iommufd_out, ioas_out);
    return dev;
}

static int cmd_device(const char *cdev, long iters_ioctl, long iters_mmio, int repeats)
{
    int iommufd;
    uint32_t ioas;
    int dev = open_device(cdev, &iommufd, &ioas);
    uint64_t ns[MAX_REPEATS];

    for (int r = 0; r < repeats; r++) {
        uint64_t t0 = now_ns();
        for (long i = 0; i < iters_ioctl; i++) {
            struct vfio_device_info info = { .argsz = sizeof(info) };
            if (ioctl(dev, VFIO_DEVICE_GET_INFO, &info) < 0)
                die("VFIO_DEVICE_GET_INFO");
        }
        ns[r] = now_ns() - t0;
    }
    report("ioctl_get_info", iters_ioctl, ns, repeats);

    struct vfio_region_info region = { .argsz = sizeof(region), .index = VFIO_PCI_BAR0_REGION_INDEX };
    if (ioctl(dev, VFIO_DEVICE_GET_REGION_INFO, &region) < 0)
        die("VFIO_DEVICE_GET_REGION_INFO");
    char *bar = mmap(NULL, region.size, PROT_READ | PROT_WRITE, MAP_SHARED, dev, (off_t)region.offset);
    if (bar == MAP_FAILED)
        die("mmap BAR0");
    volatile uint32_t *id = (volatile uint32_t *)(bar + 0);
    volatile uint32_t *liveness = (volatile uint32_t *)(bar + 4);
    uint32_t sink = 0;

    for (int r = 0; r < repeats; r++) {
        uint64_t t0 = now_ns();
        for (long i = 0; i < iters_mmio; i++)
            sink += *id;
        ns[r] = now_ns() - t0;
    }
    report("mmio_read32", iters_mmio, ns, repeats);
    if (sink != (uint32_t)(0x010000edu * (uint32_t)(iters_mmio * repeats)))
        fprintf(stderr, "bench: unexpected edu id reads\n");

    for (int r = 0; r < repeats; r++) {
        uint64_t t0 = now_ns();
        for (long i = 0; i < iters_mmio; i++)
            *liveness = (uint32_t)i;
        ns[r] = now_ns() - t0;
    }
    report("mmio_write32", iters_mmio, ns, repeats);

    /* register blocks, the work of a pyvfio_lu RegisterBlock: the registers at an array of
       offsets read into (or written from) an array of uint64 values, in order, each access
       one volatile 32-bit load or store; per-access figures over the same total as above */
    static const long block_sizes[] = {256, 4096};
    for (int b = 0; b < 2; b++) {
        long size = block_sizes[b], calls = iters_mmio < size ? 1 : iters_mmio / size;
        uint64_t *offs = calloc((size_t)size, 8), *vals = calloc((size_t)size, 8);
        char name[64];
        if (!offs || !vals)
            die("calloc");
        for (long k = 0; k < size; k++)  /* edu's id register (read) and liveness register (write) */
            offs[k] = 0;
        for (int r = 0; r < repeats; r++) {
            uint64_t t0 = now_ns();
            for (long c = 0; c < calls; c++)
                for (long k = 0; k < size; k++)
                    vals[k] = *(volatile uint32_t *)(bar + offs[k]);
            ns[r] = now_ns() - t0;
        }
        for (long k = 0; k < size; k++)
            if (vals[k] != 0x010000edu)
                die("edu id through the block");
        snprintf(name, sizeof(name), "mmio_block_read%s", b ? "_4096" : "");
        report(name, calls * size, ns, repeats);
        for (long k = 0; k < size; k++)
            offs[k] = 4, vals[k] = (uint64_t)k;
        for (int r = 0; r < repeats; r++) {
            uint64_t t0 = now_ns();
            for (long c = 0; c < calls; c++)
                for (long k = 0; k < size; k++)
                    *(volatile uint32_t *)(bar + offs[k]) = (uint32_t)vals[k];
            ns[r] = now_ns() - t0;
        }
        snprintf(name, sizeof(name), "mmio_block_write%s", b ? "_4096" : "");
        report(name, calls * size, ns, repeats);
        free(offs);
        free(vals);
    }

    /* a register poll that matches at once, as pyvfio_lu's Bar.poll does it: the deadline
       from CLOCK_MONOTONIC, then read and compare */
    for (int r = 0; r < repeats; r++) {
        uint64_t t0 = now_ns();
        for (long i = 0; i < iters_ioctl; i++) {
            uint64_t deadline = now_ns() + 1000000000ull;
            while ((*id & 0xffffffffu) != 0x010000edu)
                if (now_ns() >= deadline)
                    die("poll");
        }
        ns[r] = now_ns() - t0;
    }
    report("mmio_poll", iters_ioctl, ns, repeats);

    munmap(bar, region.size);
    close(dev);
    close(iommufd);
    return 0;
}

static int cmd_getname(long iters, int repeats)
{
    int luo = open("/dev/liveupdate", O_RDWR | O_CLOEXEC);
    if (luo < 0)
        die("/dev/liveupdate");
    struct liveupdate_ioctl_create_session create = { .size = sizeof(create) };
    snprintf((char *)create.name, sizeof(create.name), "bench-getname-c-%d", (int)getpid());
    if (ioctl(luo, LIVEUPDATE_IOCTL_CREATE_SESSION, &create) < 0)
        die("LIVEUPDATE_IOCTL_CREATE_SESSION");
    close(luo);
    uint64_t ns[MAX_REPEATS];
    for (int r = 0; r < repeats; r++) {
        uint64_t t0 = now_ns();
        for (long i = 0; i < iters; i++) {
            struct liveupdate_session_get_name arg = { .size = sizeof(arg) };
            if (ioctl(create.fd, LIVEUPDATE_SESSION_GET_NAME, &arg) < 0)
                die("LIVEUPDATE_SESSION_GET_NAME");
        }
        ns[r] = now_ns() - t0;
    }
    report("ioctl_get_name", iters, ns, repeats);
    close(create.fd);
    return 0;
}

static int cmd_dma(const char *cdev, uint64_t total, uint64_t piece, int rounds, uint64_t iova0)
{
    int iommufd;
    uint32_t ioas;
    int dev = open_device(cdev, &iommufd, &ioas);
    char *buf = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED)
        die("mmap buffer");
    for (uint64_t off = 0; off < total; off += 4096)
        buf[off] = 1;  /* fault every page in before timing, as the Python side does */
    uint64_t n = total / piece, map_ns[MAX_REPEATS], unmap_ns[MAX_REPEATS];

    for (int r = 0; r < rounds; r++) {
        uint64_t t0 = now_ns();
        for (uint64_t i = 0; i < n; i++) {
            struct iommu_ioas_map map = {
                .size = sizeof(map),
                .flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
                .ioas_id = ioas,
                .user_va = (uint64_t)(uintptr_t)(buf + i * piece),
                .length = piece,
                .iova = iova0 + i * piece,
            };
            if (ioctl(iommufd, IOMMU_IOAS_MAP, &map) < 0)
                die("IOMMU_IOAS_MAP");
        }
        uint64_t t1 = now_ns();
        for (uint64_t i = 0; i < n; i++) {
            struct iommu_ioas_unmap unmap = {
                .size = sizeof(unmap), .ioas_id = ioas, .iova = iova0 + i * piece, .length = piece,
            };
            if (ioctl(iommufd, IOMMU_IOAS_UNMAP, &unmap) < 0)
                die("IOMMU_IOAS_UNMAP");
        }
        map_ns[r] = t1 - t0;
        unmap_ns[r] = now_ns() - t1;
    }
    char name[64];
    snprintf(name, sizeof(name), "dma_map_%llu", (unsigned long long)piece);
    report(name, (long)n, map_ns, rounds);
    snprintf(name, sizeof(name), "dma_unmap_%llu", (unsigned long long)piece);
    report(name, (long)n, unmap_ns, rounds);
    munmap(buf, total);
    close(dev);
    close(iommufd);
    return 0;
}

/* what memfd i holds: "file-data-<i>" in a 4 KiB file, as in the kernel's luo_stress_files */
static void memfd_data(char *page, long i)
{
    memset(page, 0, MEMFD_SIZE);
    snprintf(page, MEMFD_SIZE, "file-data-%ld", i);
}

static int cmd_lu_preserve(const char *session, long files)
{
    static char page[MEMFD_SIZE];
    uint64_t t0 = now_ns();
    int luo = open("/dev/liveupdate", O_RDWR | O_CLOEXEC);
    if (luo < 0)
        die("/dev/liveupdate");
    struct liveupdate_ioctl_create_session create = { .size = sizeof(create) };
    snprintf((char *)create.name, sizeof(create.name), "%s", session);
    if (ioctl(luo, LIVEUPDATE_IOCTL_CREATE_SESSION, &create) < 0)
        die("LIVEUPDATE_IOCTL_CREATE_SESSION");
    for (long i = 0; i < files; i++) {
        memfd_data(page, i);
        int mfd = memfd_create("bench", MFD_CLOEXEC | MFD_ALLOW_SEALING);
        if (mfd < 0)
            die("memfd_create");
        if (ftruncate(mfd, MEMFD_SIZE) < 0)
            die("ftruncate");
        size_t len = strlen(page);
        if (pwrite(mfd, page, len, 0) != (ssize_t)len)
            die("pwrite");
        struct liveupdate_session_preserve_fd arg = { .size = sizeof(arg), .fd = mfd, .token = (uint64_t)i };
        if (ioctl(create.fd, LIVEUPDATE_SESSION_PRESERVE_FD, &arg) < 0)
            die("LIVEUPDATE_SESSION_PRESERVE_FD");
        close(mfd);
    }
    close(luo);
    uint64_t ns = now_ns() - t0;
    report("lu_preserve", files, &ns, 1);

    /* the session must outlive this process: a detached child keeps its fd until the kexec */
    pid_t pid = fork();
    if (pid < 0)
        die("fork");
    if (pid == 0) {
        setsid();
        int null = open("/dev/null", O_RDWR);
        dup2(null, 0);
        dup2(null, 1);
        dup2(null, 2);
        signal(SIGINT, SIG_IGN);
        for (;;)
            pause();
    }
    close(create.fd);
    return 0;
}

static int cmd_lu_retrieve(const char *session, long files)
{
    static char expected[MEMFD_SIZE], got[MEMFD_SIZE];
    long bad = 0;
    uint64_t t0 = now_ns();
    int luo = open("/dev/liveupdate", O_RDWR | O_CLOEXEC);
    if (luo < 0)
        die("/dev/liveupdate");
    struct liveupdate_ioctl_retrieve_session ret = { .size = sizeof(ret) };
    snprintf((char *)ret.name, sizeof(ret.name), "%s", session);
    if (ioctl(luo, LIVEUPDATE_IOCTL_RETRIEVE_SESSION, &ret) < 0)
        die("LIVEUPDATE_IOCTL_RETRIEVE_SESSION");
    for (long i = 0; i < files; i++) {
        struct liveupdate_session_retrieve_fd arg = { .size = sizeof(arg), .token = (uint64_t)i };
        if (ioctl(ret.fd, LIVEUPDATE_SESSION_RETRIEVE_FD, &arg) < 0)
            die("LIVEUPDATE_SESSION_RETRIEVE_FD");
        struct stat st;
        if (fstat(arg.fd, &st) < 0)
            die("fstat");
        if (st.st_size != MEMFD_SIZE || pread(arg.fd, got, MEMFD_SIZE, 0) != MEMFD_SIZE)
            bad++;
        memfd_data(expected, i);
        if (memcmp(got, expected, MEMFD_SIZE))
            bad++;
        close(arg.fd);
    }
    struct liveupdate_session_finish finish = { .size = sizeof(finish) };
    if (ioctl(ret.fd, LIVEUPDATE_SESSION_FINISH, &finish) < 0)
        die("LIVEUPDATE_SESSION_FINISH");
    close(ret.fd);
    close(luo);
    uint64_t ns = now_ns() - t0;
    report("lu_retrieve", files, &ns, 1);
    if (bad) {
        fprintf(stderr, "bench: %ld memfds of %s did not hold their data\n", bad, session);
        return 1;
    }
    return 0;
}

static int cmd_pipe_ioctl(long iters, int repeats)
{
    int p[2];
    if (pipe(p) < 0)
        die("pipe");
    uint64_t ns[MAX_REPEATS];
    for (int r = 0; r < repeats; r++) {
        uint64_t t0 = now_ns();
        for (long i = 0; i < iters; i++) {
            int avail = 0;
            if (ioctl(p[0], FIONREAD, &avail) < 0)
                die("FIONREAD");
        }
        ns[r] = now_ns() - t0;
    }
    report("calib_fionread", iters, ns, repeats);
    return 0;
}

/* The blackout after a kexec, the C side (benchmarks/blackout.py is the Python one): retrieve
   SESSION, its guest RAM (token 1) and, with a device, the device (token 2); bind the device
   to a new iommufd and attach it; map the RAM at IOVA; bus mastering on; one edu DMA from the
   RAM, polled to completion; FINISH. Without a device the RAM is mapped into this process.
   Prints CLOCK_MONOTONIC ns at each step as one JSON line. */
static int cmd_blackout(const char *session, uint64_t ram_bytes, uint64_t iova, int with_device)
{
    uint64_t t_main = now_ns(), t_session, t_bound, t_mapped, t_dma, t_finished;
    int luo = open("/dev/liveupdate", O_RDWR | O_CLOEXEC);
    if (luo < 0)
        die("/dev/liveupdate");
    struct liveupdate_ioctl_retrieve_session ret = { .size = sizeof(ret) };
    snprintf((char *)ret.name, sizeof(ret.name), "%s", session);
    if (ioctl(luo, LIVEUPDATE_IOCTL_RETRIEVE_SESSION, &ret) < 0)
        die("LIVEUPDATE_IOCTL_RETRIEVE_SESSION");
    close(luo);
    t_session = now_ns();
    struct liveupdate_session_retrieve_fd ram = { .size = sizeof(ram), .token = 1 };
    if (ioctl(ret.fd, LIVEUPDATE_SESSION_RETRIEVE_FD, &ram) < 0)
        die("LIVEUPDATE_SESSION_RETRIEVE_FD ram");
    if (!with_device) {
        volatile char *m = mmap(NULL, ram_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, ram.fd, 0);
        if (m == MAP_FAILED)
            die("mmap ram");
        (void)m[0];
        t_bound = t_mapped = t_dma = now_ns();
        munmap((void *)m, ram_bytes);
    } else {
        struct liveupdate_session_retrieve_fd devr = { .size = sizeof(devr), .token = 2 };
        if (ioctl(ret.fd, LIVEUPDATE_SESSION_RETRIEVE_FD, &devr) < 0)
            die("LIVEUPDATE_SESSION_RETRIEVE_FD device");
        int dev = devr.fd, iommufd;
        uint32_t ioas;
        bind_and_attach(dev, &iommufd, &ioas);
        t_bound = now_ns();
        struct iommu_ioas_map_file map = {
            .size = sizeof(map), .ioas_id = ioas, .fd = ram.fd, .start = 0,
            .length = ram_bytes, .iova = iova,
            .flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE,
        };
        if (ioctl(iommufd, IOMMU_IOAS_MAP_FILE, &map) < 0)
            die("IOMMU_IOAS_MAP_FILE");
        t_mapped = now_ns();
        struct vfio_region_info cfg = { .argsz = sizeof(cfg), .index = VFIO_PCI_CONFIG_REGION_INDEX };
        if (ioctl(dev, VFIO_DEVICE_GET_REGION_INFO, &cfg) < 0)
            die("VFIO_DEVICE_GET_REGION_INFO config");
        uint16_t cmd;
        if (pread(dev, &cmd, 2, (off_t)cfg.offset + 4) != 2)
            die("read PCI_COMMAND");
        cmd |= 0x4; /* bus master */
        if (pwrite(dev, &cmd, 2, (off_t)cfg.offset + 4) != 2)
            die("write PCI_COMMAND");
        struct vfio_region_info bar0 = { .argsz = sizeof(bar0), .index = VFIO_PCI_BAR0_REGION_INDEX };
        if (ioctl(dev, VFIO_DEVICE_GET_REGION_INFO, &bar0) < 0)
            die("VFIO_DEVICE_GET_REGION_INFO BAR0");
        char *bar = mmap(NULL, bar0.size, PROT_READ | PROT_WRITE, MAP_SHARED, dev, (off_t)bar0.offset);
        if (bar == MAP_FAILED)
            die("mmap BAR0");
        *(volatile uint64_t *)(bar + 0x80) = iova;     /* source: guest RAM */
        *(volatile uint64_t *)(bar + 0x88) = 0x40000;  /* destination: edu's buffer */
        *(volatile uint64_t *)(bar + 0x90) = 4095;
        *(volatile uint64_t *)(bar + 0x98) = 1;        /* start, RAM -> device */
        uint64_t deadline = now_ns() + 10000000000ull;
        while (*(volatile uint64_t *)(bar + 0x98) & 1)
            if (now_ns() >= deadline)
                die("edu DMA did not complete");
        t_dma = now_ns();
        munmap(bar, bar0.size);
        close(dev);
        close(iommufd);
    }
    if (ioctl(ret.fd, LIVEUPDATE_SESSION_FINISH, &(struct liveupdate_session_finish){ .size = sizeof(struct liveupdate_session_finish) }) < 0)
        die("LIVEUPDATE_SESSION_FINISH");
    t_finished = now_ns();
    printf("{\"main\": %llu, \"session\": %llu, \"bound\": %llu, \"mapped\": %llu, \"dma\": %llu, "
           "\"finished\": %llu}\n", (unsigned long long)t_main, (unsigned long long)t_session,
           (unsigned long long)t_bound, (unsigned long long)t_mapped, (unsigned long long)t_dma,
           (unsigned long long)t_finished);
    close(ram.fd);
    close(ret.fd);
    return 0;
}

static long num(const char *s)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 0);
    if (errno || *end || v < 0) {
        fprintf(stderr, "bench: bad number %s\n", s);
        exit(2);
    }
    return (long)v;
}

static int repeats_arg(const char *s)
{
    long r = num(s);
    if (r < 1 || r > MAX_REPEATS) {
        fprintf(stderr, "bench: repeats must be 1..%d\n", MAX_REPEATS);
        exit(2);
    }
    return (int)r;
}

int main(int argc, char **argv)
{
    const char *cmd = argc > 1 ? argv[1] : "";
    if (!strcmp(cmd, "device") && argc == 6)
        return cmd_device(argv[2], num(argv[3]), num(argv[4]), repeats_arg(argv[5]));
    if (!strcmp(cmd, "getname") && argc == 4)
        return cmd_getname(num(argv[2]), repeats_arg(argv[3]));
    if (!strcmp(cmd, "dma") && argc == 7)
        return cmd_dma(argv[2], (uint64_t)num(argv[3]), (uint64_t)num(argv[4]), repeats_arg(argv[5]),
                       (uint64_t)num(argv[6]));
    if (!strcmp(cmd, "lu-preserve") && argc == 4)
        return cmd_lu_preserve(argv[2], num(argv[3]));
    if (!strcmp(cmd, "lu-retrieve") && argc == 4)
        return cmd_lu_retrieve(argv[2], num(argv[3]));
    if (!strcmp(cmd, "blackout") && (argc == 5 || argc == 6))
        return cmd_blackout(argv[2], (uint64_t)num(argv[3]), (uint64_t)num(argv[4]), argc == 6);
    if (!strcmp(cmd, "pipe-ioctl") && argc == 4)
        return cmd_pipe_ioctl(num(argv[2]), repeats_arg(argv[3]));
    fprintf(stderr, "usage: bench device CDEV ITERS_IOCTL ITERS_MMIO REPEATS | getname ITERS REPEATS |\n"
                    "       dma CDEV TOTAL PIECE ROUNDS IOVA | lu-preserve SESSION FILES | lu-retrieve SESSION FILES |\n"
                    "       pipe-ioctl ITERS REPEATS | blackout SESSION RAM_BYTES IOVA [device]\n");
    return 2;
}
