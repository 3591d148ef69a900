/* A copy that screens what it copies for NaN and Inf in the same pass.
 *
 * A CPU rank's NaN/Inf screen otherwise costs a reduction over every byte it writes, on top
 * of the copy: a quarter of an unquantized reload. A float is NaN or Inf exactly when its
 * exponent bits are all ones, and testing that while each element passes through a register
 * costs nothing next to moving it (the loop stays memory-bound; GCC vectorizes it). The
 * verdict is exact both ways: no sum that overflows, no false alarm.
 *
 * Built by `pip install` (pyproject.toml's ext-modules); called through `actors.copy_screen`,
 * whose callers copy with torch where this module is missing or a layout does not fit it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>

/* One build that runs on any x86-64 node of a cluster, at the widest vectors each has. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define WIDEST_VECTORS __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define WIDEST_VECTORS
#endif

/* Rows of `cols` contiguous elements, `*_stride` elements apart; nonzero when any element
 * has every bit of `exponent` set. Ordinary stores: what was written stays in cache. */
#define COPY_SCREEN(NAME, T)                                                              \
    WIDEST_VECTORS static int NAME(T *restrict dst, const T *restrict src, Py_ssize_t rows,  \
                                   Py_ssize_t cols, Py_ssize_t dst_stride,                  \
                                   Py_ssize_t src_stride, T exponent) {                     \
        T found = 0;                                                                         \
        for (Py_ssize_t r = 0; r < rows; r++) {                                              \
            T *d = dst + r * dst_stride;                                                     \
            const T *s = src + r * src_stride;                                               \
            for (Py_ssize_t i = 0; i < cols; i++) {                                          \
                T value = s[i];                                                              \
                d[i] = value;                                                                \
                found |= (T)((value & exponent) == exponent);                                \
            }                                                                                \
        }                                                                                    \
        return found != 0;                                                                   \
    }

COPY_SCREEN(copy_screen_16, uint16_t)
COPY_SCREEN(copy_screen_32, uint32_t)

/* A large copy into tensors nothing reads until the engine serves (the caller says so:
 * `stream`) streams: its stores go around the cache (non-temporal). An ordinary store's read
 * of the line it overwrites is then traffic for nothing, and the lines it leaves evict what
 * the rank does use. Measured here: ~30% less time for a 256 MB bf16 copy. A copy that
 * processing reads next (a quantization) keeps ordinary stores, which leave it in cache.
 * AVX2, where the node has it; the ordinary loop elsewhere. */
#define STREAM_BYTES (1 << 20)

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define CAN_STREAM 1

#define STREAM_SCREEN(NAME, T, LANES, CMPEQ, SET1, CAST)                                    \
    __attribute__((target("avx2"))) static int NAME(T *restrict dst, const T *restrict src,  \
                                                     Py_ssize_t rows, Py_ssize_t cols,        \
                                                     Py_ssize_t dst_stride,                   \
                                                     Py_ssize_t src_stride, T exponent) {     \
        const __m256i bits = SET1((CAST)exponent);                                           \
        __m256i found = _mm256_setzero_si256();                                              \
        T found_one = 0;                                                                     \
        for (Py_ssize_t r = 0; r < rows; r++) {                                              \
            T *d = dst + r * dst_stride;                                                     \
            const T *s = src + r * src_stride;                                               \
            Py_ssize_t i = 0;                                                                \
            /* Element by element until the store address is 32-byte aligned. */             \
            for (; i < cols && ((uintptr_t)(d + i) & 31); i++) {                             \
                d[i] = s[i];                                                                 \
                found_one |= (T)((s[i] & exponent) == exponent);                             \
            }                                                                                \
            for (; i + LANES <= cols; i += LANES) {                                          \
                __m256i value = _mm256_loadu_si256((const __m256i *)(s + i));                \
                found = _mm256_or_si256(found, CMPEQ(_mm256_and_si256(value, bits), bits));  \
                _mm256_stream_si256((__m256i *)(d + i), value);                              \
            }                                                                                \
            for (; i < cols; i++) {                                                          \
                d[i] = s[i];                                                                 \
                found_one |= (T)((s[i] & exponent) == exponent);                             \
            }                                                                                \
        }                                                                                    \
        _mm_sfence(); /* the streamed stores are visible before the caller goes on */        \
        return found_one != 0 || !_mm256_testz_si256(found, found);                          \
    }

STREAM_SCREEN(stream_screen_16, uint16_t, 16, _mm256_cmpeq_epi16, _mm256_set1_epi16, short)
STREAM_SCREEN(stream_screen_32, uint32_t, 8, _mm256_cmpeq_epi32, _mm256_set1_epi32, int)
#else
#define CAN_STREAM 0
#endif

static int copy_and_screen(void *dst, const void *src, Py_ssize_t rows, Py_ssize_t cols,
                           Py_ssize_t dst_stride, Py_ssize_t src_stride, Py_ssize_t itemsize,
                           uint32_t exponent, int stream) {
#if CAN_STREAM
    if (stream && rows * cols * itemsize >= STREAM_BYTES && __builtin_cpu_supports("avx2")) {
        if (itemsize == 2)
            return stream_screen_16(dst, src, rows, cols, dst_stride, src_stride,
                                    (uint16_t)exponent);
        return stream_screen_32(dst, src, rows, cols, dst_stride, src_stride, exponent);
    }
#endif
    if (itemsize == 2)
        return copy_screen_16(dst, src, rows, cols, dst_stride, src_stride, (uint16_t)exponent);
    return copy_screen_32(dst, src, rows, cols, dst_stride, src_stride, exponent);
}

static PyObject *copy(PyObject *self, PyObject *args) {
    unsigned long long dst, src, exponent;
    Py_ssize_t rows, cols, dst_stride, src_stride, itemsize;
    int stream;
    if (!PyArg_ParseTuple(args, "KKnnnnnKp", &dst, &src, &rows, &cols, &dst_stride,
                          &src_stride, &itemsize, &exponent, &stream))
        return NULL;
    if (rows < 0 || cols < 0 || dst_stride < cols || src_stride < cols) {
        PyErr_SetString(PyExc_ValueError, "copy: rows overlap or sizes are negative");
        return NULL;
    }
    if (itemsize != 2 && itemsize != 4) {
        PyErr_Format(PyExc_ValueError, "copy: %zd-byte elements (2 or 4 are screened)",
                     itemsize);
        return NULL;
    }
    int found;
    /* Other threads of the rank (its prefetch) go on while the bytes move. */
    Py_BEGIN_ALLOW_THREADS
    found = copy_and_screen((void *)(uintptr_t)dst, (const void *)(uintptr_t)src, rows, cols,
                            dst_stride, src_stride, itemsize, (uint32_t)exponent, stream);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(found);
}

static PyMethodDef methods[] = {
    {"copy", copy, METH_VARARGS,
     "copy(dst, src, rows, cols, dst_stride, src_stride, itemsize, exponent, stream)\n"
     "    -> bool\n\n"
     "Copy `rows` rows of `cols` contiguous elements of `itemsize` bytes (2 or 4) from the\n"
     "address `src` to the address `dst`, rows `*_stride` elements apart; True when any\n"
     "element has every bit of `exponent` set (a NaN or an Inf). The regions must not\n"
     "overlap. `stream`: nothing reads `dst` soon, so a large copy may go around the\n"
     "cache."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_copy_screen",
    "A copy that screens what it copies for NaN and Inf in the same pass.", -1, methods,
};

PyMODINIT_FUNC PyInit__copy_screen(void) { return PyModule_Create(&module); }
