/*
 * pyvfio_lu._speedups: the hot paths that must not pay a cffi call.
 *
 * Every cffi call releases and re-takes the GIL and converts its arguments through cffi's
 * type machinery; under TCG that alone is about 2 us, several times a 32-bit MMIO load or a
 * VFIO_DEVICE_GET_INFO. These functions are plain CPython builtins (METH_FASTCALL, the
 * limited API of 3.10, set by setup.py, so the wheel stays abi3) and keep the GIL: they are only used for
 * calls that cannot sleep for long (register access, the query ioctls, polls that match at
 * once; a poll that has to wait releases the GIL while it waits).
 *
 * They take raw addresses (Python ints) of memory the calling object owns (a mapped BAR, a
 * prepared argument struct): the module is private, its callers are pyvfio_lu's classes.
 * A register accessor reads its mapping from a state list [base, size] that the Bar
 * empties on close (size -1), so an accessor kept after close() cannot touch the unmapped
 * BAR: every offset then goes to the Python fallback, which raises the named error.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <time.h>

typedef PyObject *(*fastcall_fn)(PyObject *, PyObject *const *, Py_ssize_t);

static int nargs_is(const char *name, Py_ssize_t nargs, Py_ssize_t want)
{
    if (nargs == want)
        return 1;
    PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", name, want, nargs);
    return 0;
}

static int u64_of(PyObject *o, uint64_t *out)
{
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *out = v;
    return 0;
}

/* An fd argument: any int; one outside the fd range becomes -1 (the ioctl answers EBADF). */
static int fd_of(PyObject *o, long *out)
{
    int overflow;
    long v = PyLong_AsLongAndOverflow(o, &overflow);
    if (v == -1 && PyErr_Occurred())
        return -1;
    *out = (overflow || v < 0 || v > INT32_MAX) ? -1 : v;
    return 0;
}

static int long_of(PyObject *o, long *out)
{
    long v = PyLong_AsLong(o);
    if (v == -1 && PyErr_Occurred())
        return -1;
    *out = v;
    return 0;
}

/* ioctl(fd, request, address) -> the kernel's return value, or -errno */
static PyObject *sp_ioctl(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    long fd;
    uint64_t req, addr;
    if (!nargs_is("ioctl", nargs, 3) || fd_of(args[0], &fd) || u64_of(args[1], &req) || u64_of(args[2], &addr))
        return NULL;
    if (fd < 0 || fd > INT32_MAX)
        return PyLong_FromLong(-EBADF);
    long ret = ioctl((int)fd, (unsigned long)req, (void *)(uintptr_t)addr);
    return PyLong_FromLong(ret < 0 ? -errno : ret);
}

/* Largest argument ioctl_rw copies (every fixed-size uAPI struct it is used for is far smaller). */
#define RW_MAX 512

/* ioctl_rw(fd, request, data, release) -> bytes | int: copy data (the argument struct, its
   size field set by the caller) into a buffer of our own, issue the ioctl, and return the
   struct as the kernel left it; -errno on failure. One builtin call, no shared buffer (so
   safe from several threads); the GIL is released around the ioctl only when release is
   true (a call that may sleep: a large DMA map pins every page). */
static PyObject *sp_ioctl_rw(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    long fd, ret;
    uint64_t req;
    char *data, buf[RW_MAX];
    Py_ssize_t len;
    int release;
    if (!nargs_is("ioctl_rw", nargs, 4) || fd_of(args[0], &fd) || u64_of(args[1], &req))
        return NULL;
    if (PyBytes_AsStringAndSize(args[2], &data, &len) < 0)
        return NULL;
    if (len < (Py_ssize_t)sizeof(uint32_t) || len > RW_MAX) {
        PyErr_SetString(PyExc_ValueError, "ioctl_rw: argument size out of range");
        return NULL;
    }
    release = PyObject_IsTrue(args[3]);
    if (release < 0)
        return NULL;
    if (fd < 0 || fd > INT32_MAX)
        return PyLong_FromLong(-EBADF);
    memcpy(buf, data, (size_t)len);
    if (release) {
        PyThreadState *ts = PyEval_SaveThread();
        ret = ioctl((int)fd, (unsigned long)req, buf);
        if (ret < 0)
            ret = -errno;
        PyEval_RestoreThread(ts);
    } else {
        ret = ioctl((int)fd, (unsigned long)req, buf);
        if (ret < 0)
            ret = -errno;
    }
    if (ret < 0)
        return PyLong_FromLong(ret);
    return PyBytes_FromStringAndSize(buf, len);
}

/* The ioctl of ioctl_rw into buf (len bytes copied from data first); 0 or -errno. */
static long rw_into(PyObject *const *args, char *buf, Py_ssize_t *len, long *ret)
{
    long fd;
    uint64_t req;
    char *data;
    if (fd_of(args[0], &fd) || u64_of(args[1], &req) || PyBytes_AsStringAndSize(args[2], &data, len) < 0)
        return -1;
    if (*len < (Py_ssize_t)sizeof(uint32_t) || *len > RW_MAX) {
        PyErr_SetString(PyExc_ValueError, "ioctl: argument size out of range");
        return -1;
    }
    memcpy(buf, data, (size_t)*len);
    *ret = fd < 0 ? -EBADF : ioctl((int)fd, (unsigned long)req, buf);
    if (*ret < 0 && fd >= 0)
        *ret = -errno;
    return 0;
}

/* ioctl_record(fd, request, data, cls, first, count, tail) -> cls instance | -errno: the
   query ioctl of ioctl_rw (GIL held), then an instance of cls (a tuple subclass) holding
   (word[first], ..., word[first + count - 1]) + tail from the struct's __u32 words: a
   record in one call. */
static PyObject *sp_ioctl_record(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    char buf[RW_MAX];
    Py_ssize_t len, i;
    long ret, first, count;
    PyObject *items;
    if (!nargs_is("ioctl_record", nargs, 7) || long_of(args[4], &first) || long_of(args[5], &count))
        return NULL;
    if (!PyTuple_Check(args[6]) || !PyType_Check(args[3])
        || !PyType_IsSubtype((PyTypeObject *)args[3], &PyTuple_Type)
        || !(PyType_GetFlags((PyTypeObject *)args[3]) & Py_TPFLAGS_HEAPTYPE)) {
        PyErr_SetString(PyExc_TypeError, "ioctl_record: cls must be a tuple subclass (a namedtuple), tail a tuple");
        return NULL;
    }
    if (rw_into(args, buf, &len, &ret) < 0)
        return NULL;
    if (ret < 0)
        return PyLong_FromLong(ret);
    if (first < 0 || count < 0 || (first + count) * 4 > len) {
        PyErr_SetString(PyExc_ValueError, "ioctl_record: words outside the struct");
        return NULL;
    }
    Py_ssize_t tail = PyTuple_Size(args[6]);
    /* the record made directly as an instance of cls (a tuple subclass, as namedtuples are):
       its type's allocator, then the items set as in any new tuple */
    allocfunc alloc = (allocfunc)PyType_GetSlot((PyTypeObject *)args[3], Py_tp_alloc);
    if (!alloc)
        return NULL;
    items = alloc((PyTypeObject *)args[3], count + tail);
    if (!items)
        return NULL;
    for (i = 0; i < count; i++) {
        uint32_t word;
        memcpy(&word, buf + 4 * (first + i), 4);
        PyObject *v = PyLong_FromUnsignedLong(word);
        if (!v) {
            Py_DECREF(items);
            return NULL;
        }
        PyTuple_SetItem(items, i, v);
    }
    for (i = 0; i < tail; i++) {
        PyObject *v = PyTuple_GetItem(args[6], i);
        Py_INCREF(v);
        PyTuple_SetItem(items, count + i, v);
    }
    return items;
}

/* ioctl_text(fd, request, data, offset, size) -> str | -errno: the query ioctl of
   ioctl_rw, then the NUL-terminated text of at most size bytes at offset, decoded as
   UTF-8 with surrogateescape (a name as the kernel keeps it). */
static PyObject *sp_ioctl_text(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    char buf[RW_MAX];
    Py_ssize_t len, n;
    long ret, off, size;
    if (!nargs_is("ioctl_text", nargs, 5) || long_of(args[3], &off) || long_of(args[4], &size))
        return NULL;
    if (rw_into(args, buf, &len, &ret) < 0)
        return NULL;
    if (ret < 0)
        return PyLong_FromLong(ret);
    if (off < 0 || size < 0 || off + size > len) {
        PyErr_SetString(PyExc_ValueError, "ioctl_text: text outside the struct");
        return NULL;
    }
    for (n = 0; n < size && buf[off + n]; n++)
        ;
    return PyUnicode_DecodeUTF8(buf + off, n, "surrogateescape");
}

static uint64_t mmio_load(uintptr_t at, int width)
{
    switch (width) {
    case 1: return *(volatile uint8_t *)at;
    case 2: return *(volatile uint16_t *)at;
    case 4: return *(volatile uint32_t *)at;
    default: return *(volatile uint64_t *)at;
    }
}

static void mmio_store(uintptr_t at, int width, uint64_t v)
{
    switch (width) {
    case 1: *(volatile uint8_t *)at = (uint8_t)v; break;
    case 2: *(volatile uint16_t *)at = (uint16_t)v; break;
    case 4: *(volatile uint32_t *)at = (uint32_t)v; break;
    default: *(volatile uint64_t *)at = v; break;
    }
}

/* Window: a BAR mapped in one piece, as the register accessors see it. Its methods
   read8..read64 / write8..write64 are what a Bar installs as its own attributes (bound
   builtin methods: one call, no Python frame). close() turns every access into a call of
   the fallback (the Bar's general read/write, which raises the named error), so an
   accessor kept after the Bar is closed never touches the unmapped BAR. */
/* The dealloc of the heap types here, which take part in the cyclic GC: untrack, drop the
   references (the type's clear), free, release the type. */
static void gc_dealloc(PyObject *self, inquiry clear)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    clear(self);
    freefunc tp_free = (freefunc)PyType_GetSlot(type, Py_tp_free);
    tp_free(self);
    Py_DECREF(type);
}

typedef struct {
    PyObject_HEAD
    uintptr_t base;
    long long size;          /* -1 once closed */
    PyObject *read_fallback;  /* read_fallback(offset, width) */
    PyObject *write_fallback; /* write_fallback(offset, value, width) */
} Window;

static uintptr_t window_address(Window *w, PyObject *offset, int width)
{
    unsigned long long off;
    if (w->size < width || !PyLong_CheckExact(offset))
        return 0;
    off = PyLong_AsUnsignedLongLong(offset);
    if (off == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    if (off > (unsigned long long)(w->size - width) || off & (unsigned long long)(width - 1))
        return 0;
    return w->base + (uintptr_t)off;
}

static PyObject *window_read(Window *w, PyObject *offset, int width)
{
    uintptr_t at = window_address(w, offset, width);
    if (!at) {  /* not a valid offset, or closed: the Python path names the error */
        PyObject *wd = PyLong_FromLong(width), *r;
        if (!wd)
            return NULL;
        r = PyObject_CallFunctionObjArgs(w->read_fallback, offset, wd, NULL);
        Py_DECREF(wd);
        return r;
    }
    return PyLong_FromUnsignedLongLong(mmio_load(at, width));
}

static PyObject *window_write(Window *w, PyObject *const *args, Py_ssize_t nargs, int width, const char *name)
{
    uintptr_t at;
    uint64_t v;
    if (!nargs_is(name, nargs, 2))
        return NULL;
    at = window_address(w, args[0], width);
    if (at && PyLong_CheckExact(args[1])) {
        v = PyLong_AsUnsignedLongLong(args[1]);
        if (v == (uint64_t)-1 && PyErr_Occurred())
            PyErr_Clear();
        else if (width == 8 || v >> (8 * width) == 0) {
            mmio_store(at, width, v);
            Py_RETURN_NONE;
        }
    }
    PyObject *wd = PyLong_FromLong(width), *r;
    if (!wd)
        return NULL;
    r = PyObject_CallFunctionObjArgs(w->write_fallback, args[0], args[1], wd, NULL);
    Py_DECREF(wd);
    return r;
}

/* reads take one argument (METH_O: the interpreter's quickest call of a builtin) */
#define WINDOW_ACCESSORS(bits, width)                                                              \
    static PyObject *w_read##bits(PyObject *self, PyObject *offset)                                \
    { return window_read((Window *)self, offset, width); }                                         \
    static PyObject *w_write##bits(PyObject *self, PyObject *const *args, Py_ssize_t n)            \
    { return window_write((Window *)self, args, n, width, "write" #bits); }

WINDOW_ACCESSORS(8, 1)
WINDOW_ACCESSORS(16, 2)
WINDOW_ACCESSORS(32, 4)
WINDOW_ACCESSORS(64, 8)

static PyObject *window_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    unsigned long long base;
    long long size;
    PyObject *rf, *wf;
    if (!PyArg_ParseTuple(args, "KLOO:Window", &base, &size, &rf, &wf))
        return NULL;
    if (!base || size < 0) {
        PyErr_SetString(PyExc_ValueError, "Window: a mapped address and a size");
        return NULL;
    }
    allocfunc alloc = (allocfunc)PyType_GetSlot(type, Py_tp_alloc);
    Window *w = (Window *)alloc(type, 0);
    if (!w)
        return NULL;
    w->base = (uintptr_t)base;
    w->size = size;
    Py_INCREF(rf);
    Py_INCREF(wf);
    w->read_fallback = rf;
    w->write_fallback = wf;
    return (PyObject *)w;
}

static int window_traverse(PyObject *self, visitproc visit, void *arg)
{
    Window *w = (Window *)self;
    Py_VISIT(w->read_fallback);
    Py_VISIT(w->write_fallback);
    Py_VISIT(Py_TYPE(self));
    return 0;
}

static int window_clear(PyObject *self)
{
    Window *w = (Window *)self;
    Py_CLEAR(w->read_fallback);
    Py_CLEAR(w->write_fallback);
    return 0;
}

static void window_dealloc(PyObject *self)
{
    gc_dealloc(self, window_clear);
}

static PyObject *window_close(PyObject *self, PyObject *unused)
{
    ((Window *)self)->size = -1;
    ((Window *)self)->base = 0;
    Py_RETURN_NONE;
}

static PyObject *window_get_size(PyObject *self, void *closure)
{
    return PyLong_FromLongLong(((Window *)self)->size);
}

static PyObject *window_get_base(PyObject *self, void *closure)
{
    return PyLong_FromUnsignedLongLong(((Window *)self)->base);
}

static PyObject *window_poll(PyObject *self, PyObject *const *args, Py_ssize_t nargs);

/* Whether any value is wider than width bytes: one pass that ORs them (the compiler
   vectorises it); the caller looks for the first one only when there is one. */
static int too_wide_any(const uint64_t *v, uint64_t n, long width)
{
    uint64_t acc = 0, i;
    for (i = 0; i < n; i++)
        acc |= v[i];
    return (acc >> (8 * width)) != 0;
}

static void load_block(uint64_t base, long width, uint64_t n, const uint64_t *o, uint64_t *d);
static void store_block(uint64_t base, long width, uint64_t n, const uint64_t *o, const uint64_t *v);

static int width_ok(long width);
static PyTypeObject *Window_Type; /* set when the module is made */

/* Registers(window, width): the registers of one width of a Window by subscript, offsets
   in bytes: regs[offset] reads, regs[offset] = value writes, each one volatile access of
   exactly that width, checked as the Window's readN/writeN check it (anything else goes to
   the same fallbacks, which name the error). A subscript is the interpreter's quickest
   operation on an object (no call), as a memoryview's is. */
typedef struct {
    PyObject_HEAD
    PyObject *window;
    int width;
} Registers;

static PyObject *registers_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *window;
    long width;
    if (!PyArg_ParseTuple(args, "Ol:Registers", &window, &width) || !width_ok(width))
        return NULL;
    if (!Window_Type || !PyObject_TypeCheck(window, Window_Type)) {
        PyErr_SetString(PyExc_TypeError, "Registers: a Window and a width");
        return NULL;
    }
    allocfunc alloc = (allocfunc)PyType_GetSlot(type, Py_tp_alloc);
    Registers *r = (Registers *)alloc(type, 0);
    if (!r)
        return NULL;
    Py_INCREF(window);
    r->window = window, r->width = (int)width;
    return (PyObject *)r;
}

static int registers_traverse(PyObject *self, visitproc visit, void *arg)
{
    Py_VISIT(((Registers *)self)->window);
    Py_VISIT(Py_TYPE(self));
    return 0;
}

static int registers_clear(PyObject *self)
{
    Py_CLEAR(((Registers *)self)->window);
    return 0;
}

static void registers_dealloc(PyObject *self)
{
    gc_dealloc(self, registers_clear);
}

static PyObject *registers_get(PyObject *self, PyObject *offset)
{
    Registers *r = (Registers *)self;
    if (!r->window) {
        PyErr_SetString(PyExc_ValueError, "registers cleared");
        return NULL;
    }
    return window_read((Window *)r->window, offset, r->width);
}

static int registers_set(PyObject *self, PyObject *offset, PyObject *value)
{
    Registers *r = (Registers *)self;
    PyObject *args[2] = {offset, value}, *done;
    if (!value) {
        PyErr_SetString(PyExc_TypeError, "a register cannot be deleted");
        return -1;
    }
    if (!r->window) {
        PyErr_SetString(PyExc_ValueError, "registers cleared");
        return -1;
    }
    done = window_write((Window *)r->window, args, 2, r->width, "write");
    if (!done)
        return -1;
    Py_DECREF(done);
    return 0;
}

static PyObject *registers_iter(PyObject *self)
{
    PyErr_SetString(PyExc_TypeError, "registers are not iterable: subscript them by offset, or read a block");
    return NULL;
}

static PyObject *registers_get_width(PyObject *self, void *closure)
{
    return PyLong_FromLong(((Registers *)self)->width);
}

static PyGetSetDef registers_getset[] = {
    {"width", registers_get_width, NULL, "bytes per register", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot registers_slots[] = {
    {Py_tp_new, registers_new},
    {Py_tp_dealloc, registers_dealloc},
    {Py_tp_traverse, registers_traverse},
    {Py_tp_clear, registers_clear},
    {Py_mp_subscript, registers_get},
    {Py_mp_ass_subscript, registers_set},
    {Py_tp_iter, registers_iter},
    {Py_tp_getset, registers_getset},
    {Py_tp_doc, "Registers(window, width): regs[offset] reads, regs[offset] = value writes (exact width)"},
    {0, NULL},
};

static PyType_Spec registers_spec = {
    "pyvfio_lu._speedups.Registers", sizeof(Registers), 0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC, registers_slots,
};

/* Block(window, width, n, offsets, values, result, fill, closed, too_wide): the C half of a
   RegisterBlock, n registers of one width at the n offsets (a uint64 array, checked when the
   block was made) of a Window, with a uint64 values array; both arrays belong to the
   RegisterBlock, which the bound methods fill, closed and too_wide keep alive. read() and
   write() take no argument parsing beyond that: one call, the loop in C. */
typedef struct {
    PyObject_HEAD
    PyObject *window; /* the Window: its base, and size -1 once closed */
    long width;
    uint64_t n;
    const uint64_t *offsets;
    uint64_t *values;
    PyObject *result;   /* what read() returns: the memoryview of values */
    PyObject *fill;     /* fill(new_values): copies them into values, or raises */
    PyObject *closed;   /* closed(): raises the named error once the BAR is closed */
    PyObject *too_wide; /* too_wide(i): raises the named error for value i */
} Block;

static PyObject *block_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *window, *result, *fill, *closed, *too_wide;
    long width;
    unsigned long long n, offs, vals;
    if (!PyArg_ParseTuple(args, "OlKKKOOOO:Block", &window, &width, &n, &offs, &vals, &result, &fill, &closed,
                          &too_wide))
        return NULL;
    if (!width_ok(width))
        return NULL;
    if (!offs || !vals || !Window_Type || !PyObject_TypeCheck(window, Window_Type)) {
        PyErr_SetString(PyExc_TypeError, "Block: a Window and the addresses of two arrays");
        return NULL;
    }
    allocfunc alloc = (allocfunc)PyType_GetSlot(type, Py_tp_alloc);
    Block *b = (Block *)alloc(type, 0);
    if (!b)
        return NULL;
    b->width = width, b->n = n;
    b->offsets = (const uint64_t *)(uintptr_t)offs, b->values = (uint64_t *)(uintptr_t)vals;
    Py_INCREF(window), Py_INCREF(result), Py_INCREF(fill), Py_INCREF(closed), Py_INCREF(too_wide);
    b->window = window, b->result = result, b->fill = fill, b->closed = closed, b->too_wide = too_wide;
    return (PyObject *)b;
}

static int block_traverse(PyObject *self, visitproc visit, void *arg)
{
    Block *b = (Block *)self;
    Py_VISIT(b->window);
    Py_VISIT(b->result);
    Py_VISIT(b->fill);
    Py_VISIT(b->closed);
    Py_VISIT(b->too_wide);
    Py_VISIT(Py_TYPE(self));
    return 0;
}

static int block_clear(PyObject *self)
{
    Block *b = (Block *)self;
    Py_CLEAR(b->window);
    Py_CLEAR(b->result);
    Py_CLEAR(b->fill);
    Py_CLEAR(b->closed);
    Py_CLEAR(b->too_wide);
    return 0;
}

static void block_dealloc(PyObject *self)
{
    gc_dealloc(self, block_clear);
}

/* The Window, if it is still mapped; NULL after calling closed() (which raises) otherwise.
   A Block cleared by the collector counts as closed. */
static Window *block_window(Block *b)
{
    Window *w = (Window *)b->window;
    if (w && w->size >= 0)
        return w;
    if (!b->closed) {
        PyErr_SetString(PyExc_ValueError, "register block cleared");
        return NULL;
    }
    PyObject *r = PyObject_CallObject(b->closed, NULL);
    Py_XDECREF(r);
    if (r && !PyErr_Occurred())
        PyErr_SetString(PyExc_ValueError, "the BAR is closed");
    return NULL;
}

/* Block.read() -> result: every register, in order, into values */
static PyObject *block_read(PyObject *self, PyObject *unused)
{
    Block *b = (Block *)self;
    Window *w = block_window(b);
    if (!w)
        return NULL;
    load_block(w->base, b->width, b->n, b->offsets, b->values);
    Py_INCREF(b->result);
    return b->result;
}

/* Block.write([new_values]): fill(new_values) first when given; then every value checked to
   fit width (too_wide(i), which raises, for the first that does not: nothing written), then
   the stores in order. */
static PyObject *block_write(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Block *b = (Block *)self;
    uint64_t i;
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "write() takes at most one argument (the values)");
        return NULL;
    }
    Window *w = block_window(b);
    if (!w)
        return NULL;
    if (nargs == 1) {
        PyObject *r = PyObject_CallFunctionObjArgs(b->fill, args[0], NULL);
        if (!r)
            return NULL;
        Py_DECREF(r);
        if (!(w = block_window(b))) /* fill ran Python code: the BAR may be closed by now */
            return NULL;
    }
    const uint64_t *v = b->values;
    if (b->width < 8 && too_wide_any(v, b->n, b->width))
        for (i = 0; i < b->n; i++)
            if (v[i] >> (8 * b->width)) {
                PyObject *idx = PyLong_FromUnsignedLongLong(i), *r;
                if (!idx)
                    return NULL;
                r = PyObject_CallFunctionObjArgs(b->too_wide, idx, NULL);
                Py_DECREF(idx);
                return r;
            }
    store_block(w->base, b->width, b->n, b->offsets, v);
    Py_RETURN_NONE;
}

static PyMethodDef block_methods[] = {
    {"read", block_read, METH_NOARGS, "read() -> the values memoryview, every register read into it in order"},
    {"write", (PyCFunction)(void (*)(void))(fastcall_fn)block_write, METH_FASTCALL,
     "write([values]): values copied in first when given; every value checked, then stored in order"},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot block_slots[] = {
    {Py_tp_new, block_new},
    {Py_tp_dealloc, block_dealloc},
    {Py_tp_traverse, block_traverse},
    {Py_tp_clear, block_clear},
    {Py_tp_methods, block_methods},
    {Py_tp_doc, "Block(window, width, n, offsets, values, result, fill, closed, too_wide): a RegisterBlock's loops"},
    {0, NULL},
};

static PyType_Spec block_spec = {
    "pyvfio_lu._speedups.Block", sizeof(Block), 0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC, block_slots,
};

#define WFAST(name, fn, doc) {name, (PyCFunction)(void (*)(void))(fastcall_fn)fn, METH_FASTCALL, doc}

static PyMethodDef window_methods[] = {
    {"read8", w_read8, METH_O, "read8(offset)"}, {"read16", w_read16, METH_O, "read16(offset)"},
    {"read32", w_read32, METH_O, "read32(offset)"}, {"read64", w_read64, METH_O, "read64(offset)"},
    WFAST("write8", w_write8, "write8(offset, value)"), WFAST("write16", w_write16, "write16(offset, value)"),
    WFAST("write32", w_write32, "write32(offset, value)"), WFAST("write64", w_write64, "write64(offset, value)"),
    WFAST("poll", window_poll, "poll(offset, width, mask, want, timeout_ns) -> (matched, last, reads), or None"),
    {"close", window_close, METH_NOARGS, "every later access goes to the fallbacks"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef window_getset[] = {
    {"size", window_get_size, NULL, "the BAR's size; -1 once closed", NULL},
    {"base", window_get_base, NULL, "the mapping's address; 0 once closed", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot window_slots[] = {
    {Py_tp_new, window_new},
    {Py_tp_dealloc, window_dealloc},
    {Py_tp_traverse, window_traverse},
    {Py_tp_clear, window_clear},
    {Py_tp_methods, window_methods},
    {Py_tp_getset, window_getset},
    {Py_tp_doc, "Window(base, size, read_fallback, write_fallback): a BAR mapped in one piece"},
    {0, NULL},
};

static PyType_Spec window_spec = {
    "pyvfio_lu._speedups.Window", sizeof(Window), 0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC, window_slots,
};

static int width_ok(long width)
{
    if (width == 1 || width == 2 || width == 4 || width == 8)
        return 1;
    PyErr_SetString(PyExc_ValueError, "width must be 1, 2, 4 or 8");
    return 0;
}

/* Blocks longer than this release the GIL (under KVM each access is a VM exit of a
   microsecond or more; other threads should not wait a millisecond for a block). */
#define LONG_BLOCK 1024

/* The block loops: one loop per width (no width test per access); blocks longer than
   LONG_BLOCK release the GIL. */
static void load_block(uint64_t base, long width, uint64_t n, const uint64_t *o, uint64_t *d)
{
    uint64_t i;
    PyThreadState *ts = n > LONG_BLOCK ? PyEval_SaveThread() : NULL;
    switch (width) {
    case 1: for (i = 0; i < n; i++) d[i] = *(volatile uint8_t *)(uintptr_t)(base + o[i]); break;
    case 2: for (i = 0; i < n; i++) d[i] = *(volatile uint16_t *)(uintptr_t)(base + o[i]); break;
    case 4: for (i = 0; i < n; i++) d[i] = *(volatile uint32_t *)(uintptr_t)(base + o[i]); break;
    default: for (i = 0; i < n; i++) d[i] = *(volatile uint64_t *)(uintptr_t)(base + o[i]); break;
    }
    if (ts)
        PyEval_RestoreThread(ts);
}

static void store_block(uint64_t base, long width, uint64_t n, const uint64_t *o, const uint64_t *v)
{
    uint64_t i;
    PyThreadState *ts = n > LONG_BLOCK ? PyEval_SaveThread() : NULL;
    switch (width) {
    case 1: for (i = 0; i < n; i++) *(volatile uint8_t *)(uintptr_t)(base + o[i]) = (uint8_t)v[i]; break;
    case 2: for (i = 0; i < n; i++) *(volatile uint16_t *)(uintptr_t)(base + o[i]) = (uint16_t)v[i]; break;
    case 4: for (i = 0; i < n; i++) *(volatile uint32_t *)(uintptr_t)(base + o[i]) = (uint32_t)v[i]; break;
    default: for (i = 0; i < n; i++) *(volatile uint64_t *)(uintptr_t)(base + o[i]) = v[i]; break;
    }
    if (ts)
        PyEval_RestoreThread(ts);
}

/* read_block(base, width, n, offsets, out): out[i] = register at offsets[i], in order.
   The offsets were checked by the caller when the block was prepared. */
static PyObject *sp_read_block(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t base, n, offs, out;
    long width;
    if (!nargs_is("read_block", nargs, 5) || u64_of(args[0], &base) || long_of(args[1], &width)
        || u64_of(args[2], &n) || u64_of(args[3], &offs) || u64_of(args[4], &out) || !width_ok(width))
        return NULL;
    const uint64_t *o = (const uint64_t *)(uintptr_t)offs;
    uint64_t *d = (uint64_t *)(uintptr_t)out;
    load_block(base, width, n, o, d);
    Py_RETURN_NONE;
}

/* write_block(base, width, n, offsets, values) -> n, after register at offsets[i] = values[i]
   for each i in order; or the index of the first value wider than width, and nothing written */
static PyObject *sp_write_block(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t base, n, offs, vals, i;
    long width;
    if (!nargs_is("write_block", nargs, 5) || u64_of(args[0], &base) || long_of(args[1], &width)
        || u64_of(args[2], &n) || u64_of(args[3], &offs) || u64_of(args[4], &vals) || !width_ok(width))
        return NULL;
    const uint64_t *o = (const uint64_t *)(uintptr_t)offs;
    const uint64_t *v = (const uint64_t *)(uintptr_t)vals;
    if (width < 8 && too_wide_any(v, n, width))
        for (i = 0; i < n; i++)
            if (v[i] >> (8 * width))
                return PyLong_FromUnsignedLongLong(i);
    store_block(base, width, n, o, v);
    return PyLong_FromUnsignedLongLong(n);
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Window.poll(offset, width, mask, want, timeout_ns) -> (matched, last value, reads), or None
   when the offset is not in the window (or it is closed). The first read keeps the GIL (a
   register that already matches costs one builtin call); the wait releases it. */
static PyObject *window_poll(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Window *w = (Window *)self;
    uint64_t mask, want, v, reads = 1;
    long width;
    long long timeout;
    int matched;
    uintptr_t at;
    if (!nargs_is("poll", nargs, 5) || long_of(args[1], &width) || !width_ok(width)
        || u64_of(args[2], &mask) || u64_of(args[3], &want))
        return NULL;
    timeout = PyLong_AsLongLong(args[4]);
    if (timeout == -1 && PyErr_Occurred())
        return NULL;
    at = window_address(w, args[0], (int)width);
    if (!at)
        Py_RETURN_NONE;
    v = mmio_load(at, (int)width);
    matched = (v & mask) == want;
    if (!matched) {
        PyThreadState *ts = PyEval_SaveThread();
        int64_t deadline = now_ns() + timeout;
        for (;;) {
            v = mmio_load(at, (int)width);
            reads++;
            if ((v & mask) == want) {
                matched = 1;
                break;
            }
            if (now_ns() >= deadline)
                break;
        }
        PyEval_RestoreThread(ts);
    }
    return Py_BuildValue("(OKK)", matched ? Py_True : Py_False, (unsigned long long)v, (unsigned long long)reads);
}

/* first_overlap(iovas, sizes, n, iova, size) -> the index of the first [iovas[i],
   iovas[i] + sizes[i]) that meets [iova, iova + size), or -1 */
static PyObject *sp_first_overlap(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t ia, sa, n, lo, size, hi, i;
    if (!nargs_is("first_overlap", nargs, 5) || u64_of(args[0], &ia) || u64_of(args[1], &sa)
        || u64_of(args[2], &n) || u64_of(args[3], &lo) || u64_of(args[4], &size))
        return NULL;
    if (!size)
        return PyLong_FromLong(-1);
    hi = lo + (size - 1) < lo ? UINT64_MAX : lo + (size - 1);
    const uint64_t *iv = (const uint64_t *)(uintptr_t)ia, *sz = (const uint64_t *)(uintptr_t)sa;
    for (i = 0; i < n; i++)
        if (sz[i] && iv[i] <= hi && iv[i] + (sz[i] - 1) >= lo)
            return PyLong_FromUnsignedLongLong(i);
    return PyLong_FromLong(-1);
}

/* sum_u64(address, n) -> the sum of n uint64 values (the bytes a batch unmapped) */
static PyObject *sp_sum_u64(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t addr, n, i, total = 0;
    if (!nargs_is("sum_u64", nargs, 2) || u64_of(args[0], &addr) || u64_of(args[1], &n))
        return NULL;
    const uint64_t *v = (const uint64_t *)(uintptr_t)addr;
    for (i = 0; i < n; i++)
        total += v[i];
    return PyLong_FromUnsignedLongLong(total);
}

/* Writes longer than this release the GIL (a memfd of guest RAM can be gigabytes). */
#define LONG_WRITE (1 << 20)

/* pwrite all of data at offset 0: 0, or the errno */
static int write_all(int fd, const char *data, Py_ssize_t len)
{
    Py_ssize_t at = 0;
    while (at < len) {
        ssize_t w = pwrite(fd, data + at, (size_t)(len - at), (off_t)at);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return w < 0 ? errno : EIO;
        at += w;
    }
    return 0;
}

/* memfd_create_many(name, flags, size, contents) -> [fd, ...], or (-errno, index, step):
   for each bytes object of the list ``contents`` a memfd made with memfd_create(name,
   flags), sized with ftruncate(size) unless size is -1, and the bytes written at offset 0
   (step 0, 1, 2: which of those failed). On failure every fd made here is closed again. */
/* close the first n fds of a list of ints */
static void close_listed(PyObject *fds, Py_ssize_t n)
{
    for (Py_ssize_t k = 0; k < n; k++)
        close((int)PyLong_AsLong(PyList_GetItem(fds, k)));
}

static PyObject *sp_memfd_create_many(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    long flags, size;
    Py_ssize_t n, i, made = 0;
    int step = 0, err;
    if (!nargs_is("memfd_create_many", nargs, 4) || long_of(args[1], &flags) || long_of(args[2], &size))
        return NULL;
    if (!PyBytes_Check(args[0]) || !PyList_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "memfd_create_many(bytes, int, int, list of bytes)");
        return NULL;
    }
    const char *name = PyBytes_AsString(args[0]);
    n = PyList_Size(args[3]);
    PyObject *out = name ? PyList_New(n) : NULL;
    if (!out)
        return NULL;
    for (i = 0; i < n; i++) {
        PyObject *item = PyList_GetItem(args[3], i), *num;
        char *data;
        Py_ssize_t len;
        int fd;
        if (!item || PyBytes_AsStringAndSize(item, &data, &len) < 0)
            goto fail_py;
        step = 0;
        fd = (int)syscall(SYS_memfd_create, name, (unsigned int)flags);
        if (fd < 0)
            goto fail_os;
        if (!(num = PyLong_FromLong(fd))) {
            close(fd);
            goto fail_py;
        }
        PyList_SetItem(out, i, num); /* steals num */
        made = i + 1;
        step = 1;
        if (size >= 0 && ftruncate(fd, (off_t)size) < 0)
            goto fail_os;
        step = 2;
        if (len > LONG_WRITE) { /* the GIL released: hold the bytes, whatever happens to the list */
            Py_INCREF(item);
            PyThreadState *ts = PyEval_SaveThread();
            err = write_all(fd, data, len);
            PyEval_RestoreThread(ts);
            Py_DECREF(item);
        } else
            err = write_all(fd, data, len);
        if (err) {
            errno = err;
            goto fail_os;
        }
    }
    return out;
fail_os: /* every fd made here closed again; (-errno, index, step) */
    err = errno;
    close_listed(out, made);
    Py_DECREF(out);
    return Py_BuildValue("(inn)", -err, i, (Py_ssize_t)step);
fail_py:
    close_listed(out, made);
    Py_DECREF(out);
    return NULL;
}

/* first_mismatch(fds, expected) -> the index of the first fd (a list of ints) whose
   contents are not exactly the bytes at the same index of ``expected`` (one pread of one
   byte more than expected; an fd that cannot be read counts as a mismatch), or -1. */
static PyObject *sp_first_mismatch(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t n, i, cap = 0;
    char *buf = NULL;
    if (!nargs_is("first_mismatch", nargs, 2))
        return NULL;
    if (!PyList_Check(args[0]) || !PyList_Check(args[1]) || PyList_Size(args[0]) != PyList_Size(args[1])) {
        PyErr_SetString(PyExc_TypeError, "first_mismatch(list of fds, list of bytes of the same length)");
        return NULL;
    }
    n = PyList_Size(args[0]);
    for (i = 0; i < n; i++) {
        long fd;
        char *want;
        Py_ssize_t len;
        ssize_t got;
        PyObject *fd_item = PyList_GetItem(args[0], i), *expected = PyList_GetItem(args[1], i);
        if (!fd_item || !expected || fd_of(fd_item, &fd) || PyBytes_AsStringAndSize(expected, &want, &len) < 0) {
            free(buf);
            return NULL;
        }
        if (len + 1 > cap) {
            char *grown = realloc(buf, (size_t)(len + 1));
            if (!grown) {
                free(buf);
                return PyErr_NoMemory();
            }
            buf = grown, cap = len + 1;
        }
        PyThreadState *ts = NULL;
        if (len > LONG_WRITE) { /* a long read without the GIL: hold the expected bytes meanwhile */
            Py_INCREF(expected);
            ts = PyEval_SaveThread();
        }
        do
            got = fd < 0 ? -1 : pread((int)fd, buf, (size_t)(len + 1), 0);
        while (got < 0 && errno == EINTR);
        int differs = got != len || memcmp(buf, want, (size_t)len) != 0;
        if (ts) {
            PyEval_RestoreThread(ts);
            Py_DECREF(expected);
        }
        if (differs)
            break;
    }
    free(buf);
    return PyLong_FromSsize_t(i < n ? i : -1);
}

#define FAST(name, fn, doc) {name, (PyCFunction)(void (*)(void))(fastcall_fn)fn, METH_FASTCALL, doc}

static PyMethodDef methods[] = {
    FAST("ioctl", sp_ioctl, "ioctl(fd, request, address) -> return value or -errno (GIL held)"),
    FAST("ioctl_rw", sp_ioctl_rw,
         "ioctl_rw(fd, request, data, release) -> the struct after the call (bytes), or -errno"),
    FAST("ioctl_record", sp_ioctl_record,
         "ioctl_record(fd, request, data, cls, first, count, tail) -> cls of the struct's __u32 words, or -errno"),
    FAST("ioctl_text", sp_ioctl_text,
         "ioctl_text(fd, request, data, offset, size) -> the NUL-terminated text at offset, or -errno"),
    FAST("sum_u64", sp_sum_u64, "sum_u64(address, n) -> the sum of n uint64 values"),
    FAST("first_overlap", sp_first_overlap, "first_overlap(iovas, sizes, n, iova, size) -> index or -1"),
    FAST("read_block", sp_read_block, "read_block(base, width, n, offsets, out)"),
    FAST("write_block", sp_write_block, "write_block(base, width, n, offsets, values) -> n, or the first value too wide"),
    FAST("memfd_create_many", sp_memfd_create_many,
         "memfd_create_many(name, flags, size, contents) -> [fd, ...], or (-errno, index, step)"),
    FAST("first_mismatch", sp_first_mismatch, "first_mismatch(fds, expected) -> index of the first mismatch, or -1"),
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pyvfio_lu._speedups",
    "Hot paths as CPython builtins (GIL held, no cffi call): private to pyvfio_lu.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__speedups(void)
{
    PyObject *m = PyModule_Create(&module), *window, *block, *registers;
    if (!m)
        return NULL;
    window = PyType_FromSpec(&window_spec);
    if (!window || PyModule_AddObject(m, "Window", window) < 0) {
        Py_XDECREF(window);
        Py_DECREF(m);
        return NULL;
    }
    Window_Type = (PyTypeObject *)window; /* the module holds it for as long as the process runs */
    block = PyType_FromSpec(&block_spec);
    if (!block || PyModule_AddObject(m, "Block", block) < 0) {
        Py_XDECREF(block);
        Py_DECREF(m);
        return NULL;
    }
    registers = PyType_FromSpec(&registers_spec);
    if (!registers || PyModule_AddObject(m, "Registers", registers) < 0) {
        Py_XDECREF(registers);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
