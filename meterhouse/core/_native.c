/* Columns of Python values -> one block in ClickHouse's Native format, for the writer's inserts.
 *
 * The writer holds a batch as parallel Python lists (str, int, float, list of str). clickhouse-connect
 * serializes them value by value in Python; this does the same in one C pass over the lists. Native
 * format (the body of `INSERT ... FORMAT Native`): LEB128 column count, LEB128 row count, then per
 * column its name and type as LEB128-prefixed strings and the values:
 *   String            LEB128 byte length + UTF-8 bytes, per row
 *   UInt8             1 byte per row
 *   Int64, UInt64     8 bytes little-endian per row (DateTime64(9) is an Int64 of nanoseconds)
 *   Int32             4 bytes little-endian per row
 *   Float64           8 bytes little-endian (IEEE 754) per row
 *   Nullable(Float64) one byte per row (1 = NULL), then the Float64 column (0 where NULL)
 *   Array(T)          UInt64 cumulative end offsets, one per row, then every element as a T column
 *                     (T = String, UInt64 or Float64)
 * Only the types the ingest tables use are supported; anything else raises ValueError, a value of the
 * wrong Python type TypeError, an integer out of range OverflowError: the caller falls back to (or
 * reports like) clickhouse-connect.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum { T_STRING, T_UINT8, T_INT32, T_INT64, T_UINT64, T_FLOAT64, T_NULLABLE_FLOAT64, T_ARRAY_STRING,
       T_ARRAY_UINT64, T_ARRAY_FLOAT64 };

typedef struct {
    char *data;
    Py_ssize_t len, cap;
    Py_ssize_t limit; /* the largest block wanted (-1: none): beyond it nothing more is allocated */
} Buf;

/* Raised when a block would pass its limit (native.py's BlockTooLarge). */
static PyObject *BlockTooLarge;

static int buf_reserve(Buf *b, Py_ssize_t more) {
    if (b->limit >= 0 && b->len + more > b->limit) {
        PyErr_Format(BlockTooLarge, "the block passes its limit of %zd bytes", b->limit);
        return -1;
    }
    if (b->len + more <= b->cap) return 0;
    Py_ssize_t cap = b->cap ? b->cap : 1 << 16;
    while (cap < b->len + more) cap *= 2;
    if (b->limit >= 0 && cap > b->limit) cap = b->limit; /* never more than the block may take */
    char *p = PyMem_Realloc(b->data, (size_t)cap);
    if (!p) {
        PyErr_NoMemory();
        return -1;
    }
    b->data = p;
    b->cap = cap;
    return 0;
}

static int put(Buf *b, const void *src, Py_ssize_t n) {
    if (buf_reserve(b, n) < 0) return -1;
    memcpy(b->data + b->len, src, (size_t)n);
    b->len += n;
    return 0;
}

static int put_leb128(Buf *b, uint64_t v) {
    Py_ssize_t n = 1; /* exactly what it takes, so that a block at its limit is not refused */
    for (uint64_t rest = v >> 7; rest; rest >>= 7) n++;
    if (buf_reserve(b, n) < 0) return -1;
    do {
        uint8_t byte = v & 0x7f;
        v >>= 7;
        if (v) byte |= 0x80;
        b->data[b->len++] = (char)byte;
    } while (v);
    return 0;
}

static int put_u64(Buf *b, uint64_t v) {
    unsigned char le[8];
    for (int i = 0; i < 8; i++) le[i] = (unsigned char)(v >> (8 * i));
    return put(b, le, 8);
}

static int put_str(Buf *b, PyObject *s) {
    if (!PyUnicode_Check(s)) {
        PyErr_Format(PyExc_TypeError, "expected str, got %.80s", Py_TYPE(s)->tp_name);
        return -1;
    }
    Py_ssize_t n;
    const char *u = PyUnicode_AsUTF8AndSize(s, &n);
    if (!u) return -1;
    if (put_leb128(b, (uint64_t)n) < 0) return -1;
    return put(b, u, n);
}

static int type_code(const char *t) {
    if (!strcmp(t, "String")) return T_STRING;
    if (!strcmp(t, "UInt8")) return T_UINT8;
    if (!strcmp(t, "Int64") || !strncmp(t, "DateTime64(", 11)) return T_INT64;
    if (!strcmp(t, "UInt64")) return T_UINT64;
    if (!strcmp(t, "Float64")) return T_FLOAT64;
    if (!strcmp(t, "Int32")) return T_INT32;
    if (!strcmp(t, "Nullable(Float64)")) return T_NULLABLE_FLOAT64;
    if (!strcmp(t, "Array(String)")) return T_ARRAY_STRING;
    if (!strcmp(t, "Array(UInt64)")) return T_ARRAY_UINT64;
    if (!strcmp(t, "Array(Float64)")) return T_ARRAY_FLOAT64;
    return -1;
}

static int put_uint64_obj(Buf *b, PyObject *o) {
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    return put_u64(b, (uint64_t)v);
}

static int put_float64_obj(Buf *b, PyObject *o) {
    double d = PyFloat_AsDouble(o);
    if (d == -1.0 && PyErr_Occurred()) return -1;
    uint64_t bits;
    memcpy(&bits, &d, 8);
    return put_u64(b, bits);
}

/* The value at i of a column (or array) of n values, as a new reference; NULL with RuntimeError when the
 * sequence no longer has n values. Converting a value can run Python code (__index__, __float__) that
 * changes the lists being read: every value is fetched afresh and held while it is converted. */
static PyObject *item(PyObject *seq, Py_ssize_t i, Py_ssize_t n) {
    if (PySequence_Fast_GET_SIZE(seq) != n) {
        PyErr_SetString(PyExc_RuntimeError, "a column changed size while it was encoded");
        return NULL;
    }
    PyObject *o = PySequence_Fast_GET_ITEM(seq, i);
    Py_INCREF(o);
    return o;
}

static int array_row(PyObject *o) {
    if (!PyList_Check(o) && !PyTuple_Check(o)) {
        PyErr_Format(PyExc_TypeError, "expected a list, got %.80s", Py_TYPE(o)->tp_name);
        return -1;
    }
    return 0;
}

static int put_value(Buf *b, int code, PyObject *o) {
    switch (code) {
    case T_STRING:
        return put_str(b, o);
    case T_UINT8: {
        long v = PyLong_AsLong(o);
        if (v == -1 && PyErr_Occurred()) return -1;
        if (v < 0 || v > 255) {
            PyErr_SetString(PyExc_OverflowError, "UInt8 value out of range");
            return -1;
        }
        unsigned char u = (unsigned char)v;
        return put(b, &u, 1);
    }
    case T_INT64: {
        long long v = PyLong_AsLongLong(o);
        if (v == -1 && PyErr_Occurred()) return -1;
        return put_u64(b, (uint64_t)v);
    }
    case T_UINT64:
        return put_uint64_obj(b, o);
    case T_FLOAT64:
        return put_float64_obj(b, o);
    case T_INT32: {
        long long v = PyLong_AsLongLong(o);
        if (v == -1 && PyErr_Occurred()) return -1;
        if (v < INT32_MIN || v > INT32_MAX) {
            PyErr_SetString(PyExc_OverflowError, "Int32 value out of range");
            return -1;
        }
        uint32_t u = (uint32_t)(int32_t)v;
        unsigned char le[4] = {(unsigned char)u, (unsigned char)(u >> 8), (unsigned char)(u >> 16),
                               (unsigned char)(u >> 24)};
        return put(b, le, 4);
    }
    }
    PyErr_SetString(PyExc_ValueError, "unsupported column type");
    return -1;
}

/* Values i in [0, n) of seq, each as a `code` value. */
static int put_values(Buf *b, int code, PyObject *seq, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *o = item(seq, i, n);
        if (!o) return -1;
        int rc = put_value(b, code, o);
        Py_DECREF(o);
        if (rc < 0) return -1;
    }
    return 0;
}

static int write_array(Buf *b, int code, PyObject *seq, Py_ssize_t rows) {
    int elem = code == T_ARRAY_STRING ? T_STRING : code == T_ARRAY_UINT64 ? T_UINT64 : T_FLOAT64;
    uint64_t end = 0;
    for (Py_ssize_t i = 0; i < rows; i++) { /* no Python code runs in this loop */
        PyObject *row = PySequence_Fast_GET_ITEM(seq, i);
        if (array_row(row) < 0) return -1;
        end += (uint64_t)PySequence_Fast_GET_SIZE(row);
        if (put_u64(b, end) < 0) return -1;
    }
    /* The values, each row checked against the length its offset says (converting a value may have
     * changed a row since). */
    uint64_t written = 0;
    for (Py_ssize_t i = 0; i < rows; i++) {
        PyObject *row = item(seq, i, rows);
        if (!row) return -1;
        int rc = array_row(row);
        Py_ssize_t n = rc < 0 ? 0 : PySequence_Fast_GET_SIZE(row);
        written += (uint64_t)n;
        if (rc == 0 && written > end) {
            PyErr_SetString(PyExc_RuntimeError, "a column changed size while it was encoded");
            rc = -1;
        }
        if (rc == 0) rc = put_values(b, elem, row, n);
        Py_DECREF(row);
        if (rc < 0) return -1;
    }
    if (written != end) {
        PyErr_SetString(PyExc_RuntimeError, "a column changed size while it was encoded");
        return -1;
    }
    return 0;
}

static int write_column(Buf *b, int code, PyObject *seq, Py_ssize_t rows) {
    if (PySequence_Fast_GET_SIZE(seq) != rows) {
        PyErr_SetString(PyExc_RuntimeError, "a column changed size while it was encoded");
        return -1;
    }
    switch (code) {
    case T_STRING:
    case T_UINT8:
    case T_INT64:
    case T_UINT64:
    case T_FLOAT64:
    case T_INT32:
        return put_values(b, code, seq, rows);
    case T_NULLABLE_FLOAT64: {
        if (buf_reserve(b, rows) < 0) return -1;
        for (Py_ssize_t i = 0; i < rows; i++) /* no Python code runs in this loop */
            b->data[b->len++] = PySequence_Fast_GET_ITEM(seq, i) == Py_None ? 1 : 0;
        Py_ssize_t nulls = b->len - rows;
        for (Py_ssize_t i = 0; i < rows; i++) {
            PyObject *o = item(seq, i, rows);
            if (!o) return -1;
            int rc;
            if (o == Py_None || b->data[nulls + i]) {
                /* A value that became None (or stopped being None) since the null map was written. */
                rc = (o == Py_None) == (b->data[nulls + i] != 0) ? put_u64(b, 0) : -1;
                if (rc < 0)
                    PyErr_SetString(PyExc_RuntimeError, "a column changed while it was encoded");
            } else {
                rc = put_float64_obj(b, o);
            }
            Py_DECREF(o);
            if (rc < 0) return -1;
        }
        return 0;
    }
    case T_ARRAY_STRING:
    case T_ARRAY_UINT64:
    case T_ARRAY_FLOAT64:
        return write_array(b, code, seq, rows);
    }
    PyErr_SetString(PyExc_ValueError, "unsupported column type");
    return -1;
}

/* native_block(names, types, columns[, max_bytes]) -> bytes; BlockTooLarge past max_bytes (-1: none) */
static PyObject *native_block(PyObject *self, PyObject *args) {
    PyObject *names, *types, *columns;
    Py_ssize_t max_bytes = -1;
    if (!PyArg_ParseTuple(args, "OOO|n", &names, &types, &columns, &max_bytes)) return NULL;
    /* Tuples (copies): converting a value can run Python code, which must not change these. */
    PyObject *fn = PySequence_Tuple(names);
    PyObject *ft = fn ? PySequence_Tuple(types) : NULL;
    PyObject *fc = ft ? PySequence_Tuple(columns) : NULL;
    PyObject *result = NULL;
    PyObject **cols = NULL;
    Py_ssize_t ncols = 0, made = 0, rows = 0;
    Buf b = {NULL, 0, 0, max_bytes};
    if (!fc) goto done;
    ncols = PySequence_Fast_GET_SIZE(fc);
    if (PySequence_Fast_GET_SIZE(fn) != ncols || PySequence_Fast_GET_SIZE(ft) != ncols) {
        PyErr_SetString(PyExc_ValueError, "names, types and columns differ in length");
        goto done;
    }
    cols = PyMem_Calloc((size_t)(ncols ? ncols : 1), sizeof(PyObject *));
    if (!cols) {
        PyErr_NoMemory();
        goto done;
    }
    for (; made < ncols; made++) {
        cols[made] = PySequence_Fast(PySequence_Fast_GET_ITEM(fc, made), "a column must be a sequence");
        if (!cols[made]) goto done;
        Py_ssize_t n = PySequence_Fast_GET_SIZE(cols[made]);
        if (made == 0) rows = n;
        else if (n != rows) {
            PyErr_SetString(PyExc_ValueError, "columns differ in length");
            made++;
            goto done;
        }
    }
    if (put_leb128(&b, (uint64_t)ncols) < 0 || put_leb128(&b, (uint64_t)rows) < 0) goto done;
    for (Py_ssize_t c = 0; c < ncols; c++) {
        PyObject *name_obj = PySequence_Fast_GET_ITEM(fn, c), *type_obj = PySequence_Fast_GET_ITEM(ft, c);
        Py_ssize_t type_len;
        const char *name = PyUnicode_AsUTF8(name_obj);
        const char *type = name ? PyUnicode_AsUTF8AndSize(type_obj, &type_len) : NULL;
        if (!type) goto done;
        /* A NUL inside the type is not part of any supported type (strcmp would stop at it). */
        int code = (size_t)type_len == strlen(type) ? type_code(type) : -1;
        if (code < 0) {
            PyErr_Format(PyExc_ValueError, "unsupported column type %.80s", type);
            goto done;
        }
        if (put_str(&b, name_obj) < 0 || put_str(&b, type_obj) < 0) goto done;
        if (write_column(&b, code, cols[c], rows) < 0) {
            /* Name the column: a bad value is a bug upstream, and the message is all the log gets. */
            PyObject *type_, *value, *tb;
            PyErr_Fetch(&type_, &value, &tb);
            PyErr_NormalizeException(&type_, &value, &tb);
            PyErr_Format(type_ ? type_ : PyExc_ValueError, "column %s (%s): %S", name, type,
                         value ? value : Py_None);
            Py_XDECREF(type_);
            Py_XDECREF(value);
            Py_XDECREF(tb);
            goto done;
        }
    }
    result = PyBytes_FromStringAndSize(b.data ? b.data : "", b.len);
done:
    for (Py_ssize_t i = 0; i < made; i++) Py_XDECREF(cols[i]);
    PyMem_Free(cols);
    PyMem_Free(b.data);
    Py_XDECREF(fn);
    Py_XDECREF(ft);
    Py_XDECREF(fc);
    return result;
}

/* Point identity at the edge (collector/identity.py, EdgeIdentity): one hash per row over the stream's
 * columns (a list cell hashes its items in order, with its length), then the row is new when its time is
 * after the floor and after the time its stream's entry in `last` holds (the entry is raised), and to
 * verify otherwise. Collisions only merge two streams' entries: more rows to verify, never fewer.
 * Returns (flags as bytes, one 0/1 a row; the number of 1s). */
static Py_uhash_t mix(Py_uhash_t h, Py_uhash_t v) {
    h ^= v + (Py_uhash_t)0x9E3779B97F4A7C15ULL + (h << 6) + (h >> 2);
    return h * (Py_uhash_t)0xff51afd7ed558ccdULL;
}

static PyObject *stream_marks(PyObject *self, PyObject *args) {
    PyObject *columns, *times, *last, *floor_obj;
    if (!PyArg_ParseTuple(args, "OOO!O", &columns, &times, &PyDict_Type, &last, &floor_obj)) return NULL;
    PyObject *cols = PySequence_Fast(columns, "columns must be a sequence of lists");
    if (!cols) return NULL;
    Py_ssize_t ncols = PySequence_Fast_GET_SIZE(cols);
    PyObject **colv = PySequence_Fast_ITEMS(cols);
    PyObject *result = NULL, *flags = NULL;
    if (!PyList_Check(times)) {
        PyErr_SetString(PyExc_TypeError, "times must be a list");
        goto done;
    }
    Py_ssize_t rows = PyList_GET_SIZE(times);
    for (Py_ssize_t c = 0; c < ncols; c++) {
        if (!PyList_Check(colv[c]) || PyList_GET_SIZE(colv[c]) != rows) {
            PyErr_SetString(PyExc_ValueError, "every column must be a list as long as times");
            goto done;
        }
    }
    flags = PyBytes_FromStringAndSize(NULL, rows);
    if (!flags) goto done;
    char *fv = PyBytes_AS_STRING(flags);
    Py_ssize_t verify = 0;
    for (Py_ssize_t i = 0; i < rows; i++) {
        Py_uhash_t h = 0x27d4eb2f165667c5ULL;
        for (Py_ssize_t c = 0; c < ncols; c++) {
            PyObject *cell = PyList_GET_ITEM(colv[c], i);
            if (PyList_Check(cell)) {
                Py_ssize_t n = PyList_GET_SIZE(cell);
                h = mix(h, (Py_uhash_t)n + 0x51ULL);
                for (Py_ssize_t k = 0; k < n; k++) {
                    Py_hash_t v = PyObject_Hash(PyList_GET_ITEM(cell, k));
                    if (v == -1) goto done;
                    h = mix(h, (Py_uhash_t)v);
                }
            } else {
                Py_hash_t v = PyObject_Hash(cell);
                if (v == -1) goto done;
                h = mix(h, (Py_uhash_t)v);
            }
        }
        PyObject *key = PyLong_FromUnsignedLongLong((unsigned long long)h);
        if (!key) goto done;
        PyObject *t = PyList_GET_ITEM(times, i);
        PyObject *seen = PyDict_GetItemWithError(last, key); /* borrowed */
        if (!seen && PyErr_Occurred()) {
            Py_DECREF(key);
            goto done;
        }
        int after_floor = PyObject_RichCompareBool(t, floor_obj, Py_GT);
        int after_seen = after_floor == 1 && seen ? PyObject_RichCompareBool(t, seen, Py_GT) : 1;
        if (after_floor < 0 || after_seen < 0) {
            Py_DECREF(key);
            goto done;
        }
        if (after_floor && after_seen) {
            fv[i] = 0;
            if (PyDict_SetItem(last, key, t) < 0) {
                Py_DECREF(key);
                goto done;
            }
        } else {
            fv[i] = 1;
            verify++;
        }
        Py_DECREF(key);
    }
    result = Py_BuildValue("(On)", flags, verify);
done:
    Py_XDECREF(flags);
    Py_DECREF(cols);
    return result;
}

static PyMethodDef methods[] = {
    {"stream_marks", stream_marks, METH_VARARGS,
     "stream_marks(columns, times, last, floor) -> (bytes, int): the edge's point-identity flags."},
    {"native_block", native_block, METH_VARARGS,
     "native_block(names, types, columns[, max_bytes]) -> bytes: one ClickHouse Native-format block; "
     "BlockTooLarge, before allocating more, when it would pass max_bytes."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__native(void) {
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    BlockTooLarge = PyErr_NewException("meterhouse.core._native.BlockTooLarge", PyExc_ValueError, NULL);
    if (!BlockTooLarge || PyModule_AddObjectRef(m, "BlockTooLarge", BlockTooLarge) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
