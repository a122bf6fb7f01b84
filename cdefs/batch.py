"""Batch loops in C, compiled after the uAPI declarations (they use its structs).

Each loop issues one ioctl (or one MMIO access) per element with a single argument struct
prepared once, and stops at the first element the kernel refuses: it returns how many
elements were done and sets ``*err`` to that element's errno (0 when all were done), so
the Python layer can name the failing element and state what succeeded before it. Python
has checked every element before the loop starts; the loops check nothing themselves
beyond what they need to stay in bounds.

- ``pvl_ioas_map_many`` / ``pvl_ioas_unmap_many``: IOMMU_IOAS_MAP / IOMMU_IOAS_UNMAP;
- ``pvl_type1_map_many`` / ``pvl_type1_unmap_many``: VFIO_IOMMU_MAP_DMA / UNMAP_DMA (a
  type1 unmap that unmapped nothing answers 0 bytes, not an error: the loop stops there
  with ENOENT, as iommufd does);
- ``pvl_luo_preserve_many`` / ``pvl_luo_retrieve_many``: LIVEUPDATE_SESSION_PRESERVE_FD /
  RETRIEVE_FD;
- ``pvl_check_pieces`` / ``pvl_values_fit`` / ``pvl_mmio_check_block``: the checks made
  before a batch (the MMIO block loops themselves are in ``cdefs/speedups.c``: no cffi
  call, so no GIL round trip per block).
"""

SOURCE = r"""

static size_t pvl_ioas_map_many(int fd, uint32_t ioas_id, uint32_t flags, size_t n,
                                uint64_t base, const uint64_t *offset, const uint64_t *iova,
                                const uint64_t *length, int *err)
{
    struct iommu_ioas_map m;
    size_t i;
    for (i = 0; i < n; i++) {
        memset(&m, 0, sizeof(m));
        m.size = sizeof(m);
        m.flags = flags;
        m.ioas_id = ioas_id;
        m.user_va = base + offset[i];
        m.length = length[i];
        m.iova = iova[i];
        if (ioctl(fd, IOMMU_IOAS_MAP, &m) < 0) {
            *err = errno;
            return i;
        }
    }
    *err = 0;
    return n;
}

static size_t pvl_ioas_unmap_many(int fd, uint32_t ioas_id, size_t n, const uint64_t *iova,
                                  const uint64_t *length, uint64_t *done, int *err)
{
    struct iommu_ioas_unmap u;
    size_t i;
    for (i = 0; i < n; i++) {
        memset(&u, 0, sizeof(u));
        u.size = sizeof(u);
        u.ioas_id = ioas_id;
        u.iova = iova[i];
        u.length = length[i];
        if (ioctl(fd, IOMMU_IOAS_UNMAP, &u) < 0) {
            *err = errno;
            return i;
        }
        done[i] = u.length;
        if (u.length == 0) {
            *err = ENOENT;
            return i;
        }
    }
    *err = 0;
    return n;
}

static size_t pvl_type1_map_many(int fd, uint32_t flags, size_t n, uint64_t base,
                                 const uint64_t *offset, const uint64_t *iova, const uint64_t *size, int *err)
{
    struct vfio_iommu_type1_dma_map m;
    size_t i;
    for (i = 0; i < n; i++) {
        memset(&m, 0, sizeof(m));
        m.argsz = sizeof(m);
        m.flags = flags;
        m.vaddr = base + offset[i];
        m.iova = iova[i];
        m.size = size[i];
        if (ioctl(fd, VFIO_IOMMU_MAP_DMA, &m) < 0) {
            *err = errno;
            return i;
        }
    }
    *err = 0;
    return n;
}

static size_t pvl_type1_unmap_many(int fd, size_t n, const uint64_t *iova, const uint64_t *size,
                                   uint64_t *done, int *err)
{
    struct vfio_iommu_type1_dma_unmap u;
    size_t i;
    for (i = 0; i < n; i++) {
        memset(&u, 0, sizeof(u));
        u.argsz = sizeof(u);
        u.iova = iova[i];
        u.size = size[i];
        if (ioctl(fd, VFIO_IOMMU_UNMAP_DMA, &u) < 0) {
            *err = errno;
            return i;
        }
        done[i] = u.size;
        if (u.size == 0) {
            *err = ENOENT;
            return i;
        }
    }
    *err = 0;
    return n;
}

static size_t pvl_luo_preserve_many(int session_fd, size_t n, const int32_t *fds,
                                    const uint64_t *tokens, int *err)
{
    struct liveupdate_session_preserve_fd p;
    size_t i;
    for (i = 0; i < n; i++) {
        memset(&p, 0, sizeof(p));
        p.size = sizeof(p);
        p.fd = fds[i];
        p.token = tokens[i];
        if (ioctl(session_fd, LIVEUPDATE_SESSION_PRESERVE_FD, &p) < 0) {
            *err = errno;
            return i;
        }
    }
    *err = 0;
    return n;
}

static size_t pvl_luo_retrieve_many(int session_fd, size_t n, const uint64_t *tokens,
                                    int32_t *fds, int *err)
{
    struct liveupdate_session_retrieve_fd r;
    size_t i;
    for (i = 0; i < n; i++) {
        memset(&r, 0, sizeof(r));
        r.size = sizeof(r);
        r.token = tokens[i];
        if (ioctl(session_fd, LIVEUPDATE_SESSION_RETRIEVE_FD, &r) < 0) {
            *err = errno;
            return i;
        }
        fds[i] = r.fd;
    }
    *err = 0;
    return n;
}



/* Checks DMA pieces (offset into a buffer of buflen bytes at base, iova, size) before any
   is mapped: the index of the first piece that is empty, not page-aligned (address, IOVA or
   size), outside the buffer or wrapping the IOVA space, or n when all are good. */
static size_t pvl_check_pieces(uint64_t base, uint64_t buflen, uint64_t page, size_t n,
                               const uint64_t *offset, const uint64_t *iova, const uint64_t *size)
{
    size_t i;
    for (i = 0; i < n; i++) {
        if (size[i] == 0 || (base + offset[i]) % page || iova[i] % page || size[i] % page)
            return i;
        if (offset[i] > buflen || buflen - offset[i] < size[i] || iova[i] + (size[i] - 1) < iova[i])
            return i;
    }
    return n;
}

/* The index of the first value that does not fit `width` bytes, or n. */
static size_t pvl_values_fit(unsigned int width, size_t n, const uint64_t *values)
{
    size_t i;
    if (width >= 8)
        return n;
    for (i = 0; i < n; i++)
        if (values[i] >> (8 * width))
            return i;
    return n;
}

/* Checks a block of offsets against a BAR of `size` bytes: the index of the first offset
   that is out of bounds or not `width`-aligned, or n when all are good. */
static size_t pvl_mmio_check_block(uint64_t size, unsigned int width, size_t n, const uint64_t *offsets)
{
    size_t i;
    for (i = 0; i < n; i++)
        if (offsets[i] > size || size - offsets[i] < width || offsets[i] % width)
            return i;
    return n;
}


"""

CDEF = """
size_t pvl_ioas_map_many(int fd, uint32_t ioas_id, uint32_t flags, size_t n, uint64_t base,
                         const uint64_t *offset, const uint64_t *iova, const uint64_t *length, int *err);
size_t pvl_ioas_unmap_many(int fd, uint32_t ioas_id, size_t n, const uint64_t *iova, const uint64_t *length,
                           uint64_t *done, int *err);
size_t pvl_type1_map_many(int fd, uint32_t flags, size_t n, uint64_t base, const uint64_t *offset,
                          const uint64_t *iova,
                          const uint64_t *size, int *err);
size_t pvl_type1_unmap_many(int fd, size_t n, const uint64_t *iova, const uint64_t *size, uint64_t *done,
                            int *err);
size_t pvl_luo_preserve_many(int session_fd, size_t n, const int32_t *fds, const uint64_t *tokens, int *err);
size_t pvl_luo_retrieve_many(int session_fd, size_t n, const uint64_t *tokens, int32_t *fds, int *err);
size_t pvl_check_pieces(uint64_t base, uint64_t buflen, uint64_t page, size_t n, const uint64_t *offset,
                        const uint64_t *iova, const uint64_t *size);
size_t pvl_values_fit(unsigned int width, size_t n, const uint64_t *values);
size_t pvl_mmio_check_block(uint64_t size, unsigned int width, size_t n, const uint64_t *offsets);
"""
