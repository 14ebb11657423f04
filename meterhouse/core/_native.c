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

/* Several Native blocks of the same columns -> one block holding their rows in order: what the writer
 * sends for a group of spool records (one block per group: the engine parses, squashes and runs its
 * views over one block instead of one per record). Each column's values are copied as they are, except
 * an array's end offsets, which continue from the blocks before, and the two parts of a Nullable or an
 * Array column (null map / offsets, then the values), which are laid out part by part. A block that is
 * truncated, carries trailing bytes, or has other columns than the first raises ValueError. */
typedef struct {
    const unsigned char *p, *end;
} Rd;

static int rd_leb(Rd *r, uint64_t *v) {
    uint64_t n = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (r->p >= r->end) goto bad;
        unsigned char byte = *r->p++;
        n |= (uint64_t)(byte & 0x7f) << shift;
        if (byte < 0x80) {
            *v = n;
            return 0;
        }
    }
bad:
    PyErr_SetString(PyExc_ValueError, "Native block is truncated");
    return -1;
}

static int rd_skip(Rd *r, uint64_t n) {
    if ((uint64_t)(r->end - r->p) < n) {
        PyErr_SetString(PyExc_ValueError, "Native block is truncated");
        return -1;
    }
    r->p += n;
    return 0;
}

/* Skip n values of `size` bytes (a count too large to be a size is a truncated block). */
static int rd_skip_n(Rd *r, uint64_t n, uint64_t size) {
    if (n > (uint64_t)PY_SSIZE_T_MAX / size) {
        PyErr_SetString(PyExc_ValueError, "Native block is truncated");
        return -1;
    }
    return rd_skip(r, n * size);
}

static int rd_strings(Rd *r, uint64_t n) {
    for (uint64_t i = 0; i < n; i++) {
        uint64_t len;
        if (rd_leb(r, &len) < 0 || rd_skip(r, len) < 0) return -1;
    }
    return 0;
}

static uint64_t get_u64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static void put_u64_at(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static int fixed_size(int code) {
    switch (code) {
    case T_UINT8: return 1;
    case T_INT32: return 4;
    case T_INT64: case T_UINT64: case T_FLOAT64: return 8;
    }
    return 0;
}

/* One column of one block: part a (the values, or the null map / the offsets) and part b (a Nullable's
 * or an Array's values; empty otherwise). */
typedef struct {
    const unsigned char *a, *b;
    Py_ssize_t alen, blen;
} Cell;

static int rd_column(Rd *r, int code, uint64_t rows, Cell *c) {
    c->a = r->p;
    c->b = NULL;
    c->blen = 0;
    if (code == T_STRING) {
        if (rd_strings(r, rows) < 0) return -1;
    } else if (code == T_NULLABLE_FLOAT64) {
        if (rd_skip_n(r, rows, 1) < 0) return -1;
        c->b = r->p;
        if (rd_skip_n(r, rows, 8) < 0) return -1;
        c->blen = (Py_ssize_t)rows * 8;
    } else if (code == T_ARRAY_STRING || code == T_ARRAY_UINT64 || code == T_ARRAY_FLOAT64) {
        if (rd_skip_n(r, rows, 8) < 0) return -1;
        uint64_t total = 0, prev = 0;
        for (uint64_t i = 0; i < rows; i++) {
            total = get_u64(c->a + 8 * i);
            if (total < prev) {
                PyErr_SetString(PyExc_ValueError, "Native block has decreasing array offsets");
                return -1;
            }
            prev = total;
        }
        c->b = r->p;
        if (code == T_ARRAY_STRING) {
            if (rd_strings(r, total) < 0) return -1;
        } else if (rd_skip_n(r, total, 8) < 0) {
            return -1;
        }
        c->blen = r->p - c->b;
        c->alen = (Py_ssize_t)rows * 8;
        return 0;
    } else {
        int size = fixed_size(code);
        if (!size) {
            PyErr_SetString(PyExc_ValueError, "unsupported column type");
            return -1;
        }
        if (rd_skip_n(r, rows, (uint64_t)size) < 0) return -1;
    }
    c->alen = (c->b ? c->b : r->p) - c->a;
    return 0;
}

/* concat_blocks(blocks) -> bytes */
static PyObject *concat_blocks(PyObject *self, PyObject *args) {
    PyObject *seq_arg;
    if (!PyArg_ParseTuple(args, "O", &seq_arg)) return NULL;
    PyObject *seq = PySequence_Fast(seq_arg, "blocks must be a sequence of bytes");
    if (!seq) return NULL;
    Py_ssize_t nb = PySequence_Fast_GET_SIZE(seq);
    PyObject *result = NULL;
    Cell *cells = NULL;
    int *codes = NULL;
    Py_buffer *views = PyMem_Calloc((size_t)(nb ? nb : 1), sizeof(Py_buffer));
    Py_ssize_t held = 0;
    Buf out = {NULL, 0, 0, -1};
    if (!views) {
        PyErr_NoMemory();
        goto done;
    }
    for (; held < nb; held++)
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, held), &views[held], PyBUF_SIMPLE) < 0) goto done;
    if (nb == 0) {
        PyErr_SetString(PyExc_ValueError, "no blocks to concatenate");
        goto done;
    }
    /* The first block's head: its columns' names and types (raw, to compare and copy). */
    Rd r0 = {views[0].buf, (const unsigned char *)views[0].buf + views[0].len};
    uint64_t ncols, rows;
    if (rd_leb(&r0, &ncols) < 0) goto done;
    if (ncols > 4096) {
        PyErr_SetString(PyExc_ValueError, "Native block has too many columns");
        goto done;
    }
    cells = PyMem_Calloc((size_t)(nb * (Py_ssize_t)ncols + 1), sizeof(Cell));
    codes = PyMem_Calloc((size_t)ncols + 1, sizeof(int));
    /* Per column the head's bytes (name and type, LEB128-prefixed) in block 0: kept as cells too. */
    Cell *heads = PyMem_Calloc((size_t)ncols + 1, sizeof(Cell));
    if (!cells || !codes || !heads) {
        PyMem_Free(heads);
        PyErr_NoMemory();
        goto done;
    }
    uint64_t total_rows = 0;
    for (Py_ssize_t i = 0; i < nb; i++) {
        Rd r = {views[i].buf, (const unsigned char *)views[i].buf + views[i].len};
        uint64_t n;
        if (rd_leb(&r, &n) < 0 || rd_leb(&r, &rows) < 0) goto heads_done;
        if (n != ncols) {
            PyErr_SetString(PyExc_ValueError, "the blocks differ in their columns");
            goto heads_done;
        }
        total_rows += rows;
        for (uint64_t c = 0; c < ncols; c++) {
            const unsigned char *head = r.p;
            uint64_t len;
            if (rd_leb(&r, &len) < 0 || rd_skip(&r, len) < 0) goto heads_done;
            if (rd_leb(&r, &len) < 0) goto heads_done;
            const unsigned char *type = r.p;
            if (rd_skip(&r, len) < 0) goto heads_done;
            Py_ssize_t hlen = r.p - head;
            if (i == 0) {
                heads[c].a = head;
                heads[c].alen = hlen;
                char tname[64];
                Py_ssize_t tlen = (Py_ssize_t)len;
                if (tlen <= 0 || tlen >= (Py_ssize_t)sizeof(tname)) {
                    PyErr_SetString(PyExc_ValueError, "unsupported column type");
                    goto heads_done;
                }
                memcpy(tname, type, (size_t)tlen);
                tname[tlen] = 0;
                codes[c] = type_code(tname);
                if (codes[c] < 0) {
                    PyErr_Format(PyExc_ValueError, "unsupported column type %s", tname);
                    goto heads_done;
                }
            } else if (hlen != heads[c].alen || memcmp(head, heads[c].a, (size_t)hlen)) {
                PyErr_SetString(PyExc_ValueError, "the blocks differ in their columns");
                goto heads_done;
            }
            if (rd_column(&r, codes[c], rows, &cells[i * (Py_ssize_t)ncols + (Py_ssize_t)c]) < 0)
                goto heads_done;
        }
        if (r.p != r.end) {
            PyErr_SetString(PyExc_ValueError, "Native block has trailing bytes");
            goto heads_done;
        }
    }
    if (put_leb128(&out, ncols) < 0 || put_leb128(&out, total_rows) < 0) goto heads_done;
    for (uint64_t c = 0; c < ncols; c++) {
        if (put(&out, heads[c].a, heads[c].alen) < 0) goto heads_done;
        int arr = codes[c] == T_ARRAY_STRING || codes[c] == T_ARRAY_UINT64 || codes[c] == T_ARRAY_FLOAT64;
        uint64_t base = 0;
        for (Py_ssize_t i = 0; i < nb; i++) {
            Cell *cell = &cells[i * (Py_ssize_t)ncols + (Py_ssize_t)c];
            if (!arr) {
                if (put(&out, cell->a, cell->alen) < 0) goto heads_done;
                continue;
            }
            uint64_t end = 0;
            for (Py_ssize_t k = 0; k < cell->alen; k += 8) {
                end = get_u64(cell->a + k);
                if (put_u64(&out, base + end) < 0) goto heads_done;
            }
            base += end;
        }
        for (Py_ssize_t i = 0; i < nb; i++) {
            Cell *cell = &cells[i * (Py_ssize_t)ncols + (Py_ssize_t)c];
            if (cell->b && put(&out, cell->b, cell->blen) < 0) goto heads_done;
        }
    }
    result = PyBytes_FromStringAndSize(out.data ? out.data : "", out.len);
heads_done:
    PyMem_Free(heads);
done:
    for (Py_ssize_t i = 0; i < held; i++) PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    PyMem_Free(cells);
    PyMem_Free(codes);
    PyMem_Free(out.data);
    Py_DECREF(seq);
    return result;
}

/* What the writer derives from a group's block besides inserting it (collector/writer.py): per org its
 * first and last point time and points (org_last_seen), per (metric, kind) its last unit, last time and
 * points (metric_catalog), and the group's distinct (attribute set, hour) pairs (org, metric, keys,
 * values, the hour of the time, and the kind: only sums' count for the cardinality) that are not in `seen`, with their 16-byte keys (two 64-bit hashes): their
 * sets as a Native block for attribute_sets, and those of sums as a block for the attribute-cardinality
 * views, so that the writer sends each set once an hour, not once a point. Strings are compared by their
 * bytes. */
typedef struct {
    const unsigned char *p;
    Py_ssize_t n;
} Str;

typedef struct {
    uint64_t ncols, rows;
    Str names[64];
    int codes[64];
    Cell cells[64];
} Parsed;

static int parse_block(const unsigned char *buf, Py_ssize_t len, Parsed *out) {
    Rd r = {buf, buf + len};
    if (rd_leb(&r, &out->ncols) < 0 || rd_leb(&r, &out->rows) < 0) return -1;
    if (out->ncols > 64) {
        PyErr_SetString(PyExc_ValueError, "Native block has too many columns");
        return -1;
    }
    for (uint64_t c = 0; c < out->ncols; c++) {
        uint64_t n;
        if (rd_leb(&r, &n) < 0) return -1;
        out->names[c].p = r.p;
        out->names[c].n = (Py_ssize_t)n;
        if (rd_skip(&r, n) < 0 || rd_leb(&r, &n) < 0) return -1;
        const unsigned char *type = r.p;
        if (rd_skip(&r, n) < 0) return -1;
        char tname[64];
        if (n == 0 || n >= sizeof(tname)) {
            PyErr_SetString(PyExc_ValueError, "unsupported column type");
            return -1;
        }
        memcpy(tname, type, (size_t)n);
        tname[n] = 0;
        out->codes[c] = type_code(tname);
        if (out->codes[c] < 0) {
            PyErr_Format(PyExc_ValueError, "unsupported column type %s", tname);
            return -1;
        }
        if (rd_column(&r, out->codes[c], out->rows, &out->cells[c]) < 0) return -1;
    }
    if (r.p != r.end) {
        PyErr_SetString(PyExc_ValueError, "Native block has trailing bytes");
        return -1;
    }
    return 0;
}

static int find_column(const Parsed *b, const char *name, int code) {
    size_t n = strlen(name);
    for (uint64_t c = 0; c < b->ncols; c++)
        if ((size_t)b->names[c].n == n && !memcmp(b->names[c].p, name, n)) {
            if (b->codes[c] != code) break;
            return (int)c;
        }
    PyErr_Format(PyExc_ValueError, "the block has no column %s of the expected type", name);
    return -1;
}

/* The n strings of a String column's values starting at p (already checked by rd_column). */
static void strings_at(const unsigned char *p, uint64_t n, Str *out) {
    for (uint64_t i = 0; i < n; i++) {
        uint64_t len = 0;
        for (int shift = 0;; shift += 7) {
            unsigned char byte = *p++;
            len |= (uint64_t)(byte & 0x7f) << shift;
            if (byte < 0x80) break;
        }
        out[i].p = p;
        out[i].n = (Py_ssize_t)len;
        p += len;
    }
}

static uint64_t hash_bytes(uint64_t h, const unsigned char *p, Py_ssize_t n, uint64_t seed) {
    h ^= (uint64_t)n * 0x9E3779B97F4A7C15ULL + seed;
    h *= 0xff51afd7ed558ccdULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    h ^= h >> 33;
    return h;
}

static int str_eq(Str a, Str b) { return a.n == b.n && !memcmp(a.p, b.p, (size_t)a.n); }

/* An open-addressing table of row indexes keyed by a hash, for distinct rows. */
typedef struct {
    int64_t *slots; /* row index + 1; 0 = empty */
    uint64_t *hashes;
    uint64_t mask;
} Table;

static int table_init(Table *t, uint64_t rows) {
    uint64_t cap = 16;
    while (cap < rows * 2) cap <<= 1;
    t->slots = PyMem_Calloc(cap, sizeof(int64_t));
    t->hashes = PyMem_Calloc(cap, sizeof(uint64_t));
    t->mask = cap - 1;
    if (!t->slots || !t->hashes) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void table_free(Table *t) {
    PyMem_Free(t->slots);
    PyMem_Free(t->hashes);
}

static PyObject *str_obj(Str s) { return PyUnicode_DecodeUTF8((const char *)s.p, s.n, "surrogateescape"); }

/* A set of 16-byte keys in a caller's bytearray of 16-byte slots (a power of two of them), open
 * addressing; an all-zero slot is empty, so every key has its first bit set (set_key). */
static void set_key(uint64_t h1, uint64_t h2, unsigned char *kb) {
    for (int q = 0; q < 8; q++) {
        kb[q] = (unsigned char)(h1 >> (8 * q));
        kb[8 + q] = (unsigned char)(h2 >> (8 * q));
    }
    kb[0] |= 1;
}

static int keyset_check(Py_buffer *v) {
    Py_ssize_t slots = v->len / 16;
    if (v->len % 16 || slots < 1 || (slots & (slots - 1))) {
        PyErr_SetString(PyExc_ValueError, "a key set is a power of two of 16-byte slots");
        return -1;
    }
    return 0;
}

static int keyset_has(Py_buffer *v, const unsigned char *kb) {
    uint64_t mask = (uint64_t)(v->len / 16) - 1, s = get_u64(kb + 8) & mask;
    const unsigned char *t = v->buf;
    static const unsigned char zero[16] = {0};
    for (uint64_t probes = 0; probes <= mask; probes++, s = (s + 1) & mask) {
        if (!memcmp(t + 16 * s, kb, 16)) return 1;
        if (!memcmp(t + 16 * s, zero, 16)) return 0;
    }
    return 0;
}

/* keyset_add(table, keys) -> the number of keys that were not in it (added); ValueError when full. */
static PyObject *keyset_add(PyObject *self, PyObject *args) {
    Py_buffer v;
    PyObject *keys;
    if (!PyArg_ParseTuple(args, "w*O", &v, &keys)) return NULL;
    PyObject *seq = keyset_check(&v) < 0 ? NULL : PySequence_Fast(keys, "keys must be a sequence");
    Py_ssize_t added = 0;
    if (!seq) goto fail;
    uint64_t mask = (uint64_t)(v.len / 16) - 1;
    unsigned char *t = v.buf;
    static const unsigned char zero[16] = {0};
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        PyObject *k = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyBytes_Check(k) || PyBytes_GET_SIZE(k) != 16 || !(PyBytes_AS_STRING(k)[0] & 1)) {
            PyErr_SetString(PyExc_ValueError, "a key is 16 bytes from group_summary");
            goto fail;
        }
        const unsigned char *kb = (const unsigned char *)PyBytes_AS_STRING(k);
        uint64_t s = get_u64(kb + 8) & mask, probes = 0;
        for (; probes <= mask; probes++, s = (s + 1) & mask) {
            if (!memcmp(t + 16 * s, kb, 16)) break;
            if (!memcmp(t + 16 * s, zero, 16)) {
                memcpy(t + 16 * s, kb, 16);
                added++;
                break;
            }
        }
        if (probes > mask) {
            PyErr_SetString(PyExc_ValueError, "the key set is full");
            goto fail;
        }
    }
    Py_DECREF(seq);
    PyBuffer_Release(&v);
    return PyLong_FromSsize_t(added);
fail:
    Py_XDECREF(seq);
    PyBuffer_Release(&v);
    return NULL;
}

/* split_blocks(data) -> [end, ...]: where each Native block of several written one after another ends. */
static PyObject *split_blocks(PyObject *self, PyObject *args) {
    Py_buffer v;
    if (!PyArg_ParseTuple(args, "y*", &v)) return NULL;
    PyObject *ends = PyList_New(0);
    Rd r = {v.buf, (const unsigned char *)v.buf + v.len};
    while (ends && r.p < r.end) {
        uint64_t ncols, rows, n;
        if (rd_leb(&r, &ncols) < 0 || rd_leb(&r, &rows) < 0) goto fail;
        for (uint64_t c = 0; c < ncols; c++) {
            if (rd_leb(&r, &n) < 0 || rd_skip(&r, n) < 0 || rd_leb(&r, &n) < 0) goto fail;
            const unsigned char *type = r.p;
            if (rd_skip(&r, n) < 0) goto fail;
            char tname[64];
            if (n == 0 || n >= sizeof(tname)) {
                PyErr_SetString(PyExc_ValueError, "unsupported column type");
                goto fail;
            }
            memcpy(tname, type, (size_t)n);
            tname[n] = 0;
            int code = type_code(tname);
            Cell cell;
            if (code < 0) {
                PyErr_Format(PyExc_ValueError, "unsupported column type %s", tname);
                goto fail;
            }
            if (rd_column(&r, code, rows, &cell) < 0) goto fail;
        }
        PyObject *end = PyLong_FromSsize_t(r.p - (const unsigned char *)v.buf);
        if (!end || PyList_Append(ends, end) < 0) {
            Py_XDECREF(end);
            goto fail;
        }
        Py_DECREF(end);
    }
    PyBuffer_Release(&v);
    return ends;
fail:
    Py_XDECREF(ends);
    PyBuffer_Release(&v);
    return NULL;
}

/* The start of a time's hour in seconds (times in nanoseconds; floor, as toStartOfHour). */
static int64_t hour_of(int64_t ns) {
    int64_t h = ns / 3600000000000LL;
    if (ns % 3600000000000LL < 0) h--;
    return h * 3600;
}

static int put_u32(Buf *b, uint32_t v) {
    unsigned char le[4] = {(unsigned char)v, (unsigned char)(v >> 8), (unsigned char)(v >> 16),
                           (unsigned char)(v >> 24)};
    return put(b, le, 4);
}

static int put_head(Buf *b, const char *name, const char *type) {
    if (put_leb128(b, strlen(name)) < 0 || put(b, name, (Py_ssize_t)strlen(name)) < 0) return -1;
    if (put_leb128(b, strlen(type)) < 0 || put(b, type, (Py_ssize_t)strlen(type)) < 0) return -1;
    return 0;
}

/* A String column of the picked rows. */
static int put_picked_strings(Buf *b, const Str *col, const uint64_t *rows, uint64_t n) {
    for (uint64_t q = 0; q < n; q++) {
        Str v = col[rows[q]];
        if (put_leb128(b, (uint64_t)v.n) < 0 || put(b, v.p, v.n) < 0) return -1;
    }
    return 0;
}

/* An Array(String) column (offsets `cell`, values `items`) of the picked rows. */
static int put_picked_arrays(Buf *b, const Cell *cell, const Str *items, const uint64_t *rows, uint64_t n) {
    uint64_t end = 0;
    for (uint64_t q = 0; q < n; q++) {
        uint64_t r = rows[q];
        uint64_t a0 = r ? get_u64(cell->a + 8 * (r - 1)) : 0, a1 = get_u64(cell->a + 8 * r);
        end += a1 - a0;
        if (put_u64(b, end) < 0) return -1;
    }
    for (uint64_t q = 0; q < n; q++) {
        uint64_t r = rows[q];
        uint64_t a0 = r ? get_u64(cell->a + 8 * (r - 1)) : 0, a1 = get_u64(cell->a + 8 * r);
        for (uint64_t j = a0; j < a1; j++)
            if (put_leb128(b, (uint64_t)items[j].n) < 0 || put(b, items[j].p, items[j].n) < 0) return -1;
    }
    return 0;
}

/* group_summary(block, seen, orgs) -> (orgs_or_None, catalog, sets_block, keys, cardinality_block) */
static PyObject *group_summary(PyObject *self, PyObject *args) {
    Py_buffer view, seen_view;
    int want_orgs;
    if (!PyArg_ParseTuple(args, "y*y*p", &view, &seen_view, &want_orgs)) return NULL;
    if (keyset_check(&seen_view) < 0) {
        PyBuffer_Release(&view);
        PyBuffer_Release(&seen_view);
        return NULL;
    }
    PyObject *result = NULL, *orgs = NULL, *catalog = NULL, *keys = NULL, *sets_block = NULL, *card_block = NULL;
    Parsed *b = PyMem_Calloc(1, sizeof(Parsed));
    Str *org = NULL, *metric = NULL, *kind = NULL, *unit = NULL, *akeys = NULL, *avals = NULL;
    Table t_org = {0}, t_cat = {0}, t_set = {0};
    int64_t *first = NULL, *last = NULL, *count = NULL, *cat_last = NULL, *cat_count = NULL;
    uint64_t *cat_unit = NULL, *new_rows = NULL;
    Buf out = {NULL, 0, 0, -1}, card = {NULL, 0, 0, -1};
    if (!b) {
        PyErr_NoMemory();
        goto done;
    }
    if (parse_block(view.buf, view.len, b) < 0) goto done;
    uint64_t rows = b->rows;
    int c_org = find_column(b, "org_id", T_STRING), c_metric = find_column(b, "metric", T_STRING);
    int c_kind = c_metric < 0 ? -1 : find_column(b, "kind", T_STRING);
    int c_unit = c_kind < 0 ? -1 : find_column(b, "unit", T_STRING);
    int c_time = c_unit < 0 ? -1 : find_column(b, "time", T_INT64);
    int c_keys = c_time < 0 ? -1 : find_column(b, "attr_keys", T_ARRAY_STRING);
    int c_vals = c_keys < 0 ? -1 : find_column(b, "attr_values", T_ARRAY_STRING);
    if (c_org < 0 || c_vals < 0) goto done;
    size_t n = (size_t)(rows ? rows : 1);
    org = PyMem_Malloc(n * sizeof(Str));
    metric = PyMem_Malloc(n * sizeof(Str));
    kind = PyMem_Malloc(n * sizeof(Str));
    unit = PyMem_Malloc(n * sizeof(Str));
    uint64_t nk = 0, nv = 0;
    const Cell *ck = &b->cells[c_keys], *cv = &b->cells[c_vals];
    if (rows) {
        nk = get_u64(ck->a + 8 * (rows - 1));
        nv = get_u64(cv->a + 8 * (rows - 1));
    }
    akeys = PyMem_Malloc((size_t)(nk ? nk : 1) * sizeof(Str));
    avals = PyMem_Malloc((size_t)(nv ? nv : 1) * sizeof(Str));
    first = PyMem_Malloc(n * 8);
    last = PyMem_Malloc(n * 8);
    count = PyMem_Calloc(n, 8);
    cat_last = PyMem_Malloc(n * 8);
    cat_count = PyMem_Calloc(n, 8);
    cat_unit = PyMem_Malloc(n * 8);
    new_rows = PyMem_Malloc(n * 8);
    if (!org || !metric || !kind || !unit || !akeys || !avals || !first || !last || !count || !cat_last ||
        !cat_count || !cat_unit || !new_rows) {
        PyErr_NoMemory();
        goto done;
    }
    strings_at(b->cells[c_org].a, rows, org);
    strings_at(b->cells[c_metric].a, rows, metric);
    strings_at(b->cells[c_kind].a, rows, kind);
    strings_at(b->cells[c_unit].a, rows, unit);
    strings_at(ck->b, nk, akeys);
    strings_at(cv->b, nv, avals);
    if (table_init(&t_org, rows) < 0 || table_init(&t_cat, rows) < 0 || table_init(&t_set, rows) < 0)
        goto done;
    orgs = PyList_New(0);
    catalog = PyList_New(0);
    keys = PyList_New(0);
    if (!orgs || !catalog || !keys) goto done;
    uint64_t nsets = 0;
    for (uint64_t i = 0; i < rows; i++) {
        int64_t tm = (int64_t)get_u64(b->cells[c_time].a + 8 * i);
        /* org */
        if (want_orgs) {
            uint64_t h = hash_bytes(0, org[i].p, org[i].n, 1), s = h & t_org.mask;
            while (t_org.slots[s] && !(t_org.hashes[s] == h && str_eq(org[t_org.slots[s] - 1], org[i])))
                s = (s + 1) & t_org.mask;
            if (!t_org.slots[s]) {
                t_org.slots[s] = (int64_t)i + 1;
                t_org.hashes[s] = h;
                first[i] = last[i] = tm;
            }
            uint64_t k = (uint64_t)t_org.slots[s] - 1;
            if (tm < first[k]) first[k] = tm;
            if (tm > last[k]) last[k] = tm;
            count[k]++;
        }
        /* (metric, kind) */
        {
            uint64_t h = hash_bytes(hash_bytes(0, metric[i].p, metric[i].n, 2), kind[i].p, kind[i].n, 3);
            uint64_t s = h & t_cat.mask;
            while (t_cat.slots[s] && !(t_cat.hashes[s] == h && str_eq(metric[t_cat.slots[s] - 1], metric[i]) &&
                                       str_eq(kind[t_cat.slots[s] - 1], kind[i])))
                s = (s + 1) & t_cat.mask;
            if (!t_cat.slots[s]) {
                t_cat.slots[s] = (int64_t)i + 1;
                t_cat.hashes[s] = h;
                cat_last[i] = tm;
            }
            uint64_t k = (uint64_t)t_cat.slots[s] - 1;
            if (tm > cat_last[k]) cat_last[k] = tm;
            cat_count[k]++;
            cat_unit[k] = i; /* the last row's unit */
        }
        /* (org, metric, keys, values) */
        {
            uint64_t k0 = i ? get_u64(ck->a + 8 * (i - 1)) : 0, k1 = get_u64(ck->a + 8 * i);
            uint64_t v0 = i ? get_u64(cv->a + 8 * (i - 1)) : 0, v1 = get_u64(cv->a + 8 * i);
            uint64_t h1 = hash_bytes(hash_bytes(0, org[i].p, org[i].n, 4), metric[i].p, metric[i].n, 5);
            uint64_t h2 = hash_bytes(hash_bytes(7, metric[i].p, metric[i].n, 8), org[i].p, org[i].n, 9);
            h1 ^= (k1 - k0) * 0x9E3779B97F4A7C15ULL;
            h2 ^= (v1 - v0) * 0xC2B2AE3D27D4EB4FULL;
            for (uint64_t j = k0; j < k1; j++) {
                h1 = hash_bytes(h1, akeys[j].p, akeys[j].n, 10);
                h2 = hash_bytes(h2, akeys[j].p, akeys[j].n, 11);
            }
            for (uint64_t j = v0; j < v1; j++) {
                h1 = hash_bytes(h1, avals[j].p, avals[j].n, 12);
                h2 = hash_bytes(h2, avals[j].p, avals[j].n, 13);
            }
            int64_t hour = hour_of(tm);
            unsigned char hb[8];
            for (int q = 0; q < 8; q++) hb[q] = (unsigned char)((uint64_t)hour >> (8 * q));
            h1 = hash_bytes(hash_bytes(h1, hb, 8, 14), kind[i].p, kind[i].n, 16);
            h2 = hash_bytes(hash_bytes(h2, hb, 8, 15), kind[i].p, kind[i].n, 17);
            uint64_t s = h1 & t_set.mask;
            int dup = 0;
            while (t_set.slots[s]) {
                if (t_set.hashes[s] == h1) {
                    uint64_t r = (uint64_t)t_set.slots[s] - 1;
                    uint64_t rk0 = r ? get_u64(ck->a + 8 * (r - 1)) : 0, rk1 = get_u64(ck->a + 8 * r);
                    uint64_t rv0 = r ? get_u64(cv->a + 8 * (r - 1)) : 0, rv1 = get_u64(cv->a + 8 * r);
                    int64_t rt = (int64_t)get_u64(b->cells[c_time].a + 8 * r);
                    int eq = hour_of(rt) == hour && str_eq(kind[r], kind[i]) && str_eq(org[r], org[i]) &&
                             str_eq(metric[r], metric[i]) &&
                             rk1 - rk0 == k1 - k0 && rv1 - rv0 == v1 - v0;
                    for (uint64_t j = 0; eq && j < k1 - k0; j++) eq = str_eq(akeys[rk0 + j], akeys[k0 + j]);
                    for (uint64_t j = 0; eq && j < v1 - v0; j++) eq = str_eq(avals[rv0 + j], avals[v0 + j]);
                    if (eq) {
                        dup = 1;
                        break;
                    }
                }
                s = (s + 1) & t_set.mask;
            }
            if (dup) continue;
            t_set.slots[s] = (int64_t)i + 1;
            t_set.hashes[s] = h1;
            unsigned char kb[16];
            set_key(h1, h2, kb);
            if (!keyset_has(&seen_view, kb)) {
                PyObject *key = PyBytes_FromStringAndSize((const char *)kb, 16);
                if (!key) goto done;
                int rc = PyList_Append(keys, key);
                Py_DECREF(key);
                if (rc < 0) goto done;
                new_rows[nsets++] = i;
            }
        }
    }
    /* The outputs: orgs and catalog as tuples, the new sets as a Native block. */
    for (uint64_t s = 0; want_orgs && s <= t_org.mask; s++) {
        if (!t_org.slots[s]) continue;
        uint64_t k = (uint64_t)t_org.slots[s] - 1;
        PyObject *name = str_obj(org[k]);
        PyObject *row = name ? Py_BuildValue("(NLLL)", name, (long long)first[k], (long long)last[k],
                                             (long long)count[k])
                             : NULL;
        if (!row || PyList_Append(orgs, row) < 0) {
            Py_XDECREF(row);
            goto done;
        }
        Py_DECREF(row);
    }
    for (uint64_t s = 0; s <= t_cat.mask; s++) {
        if (!t_cat.slots[s]) continue;
        uint64_t k = (uint64_t)t_cat.slots[s] - 1;
        PyObject *m = str_obj(metric[k]), *kd = m ? str_obj(kind[k]) : NULL;
        PyObject *u = kd ? str_obj(unit[cat_unit[k]]) : NULL;
        PyObject *row = u ? Py_BuildValue("(NNNLL)", m, kd, u, (long long)cat_last[k], (long long)cat_count[k])
                          : NULL;
        if (!row) {
            if (!u) {
                Py_XDECREF(m);
                Py_XDECREF(kd);
            }
            goto done;
        }
        if (PyList_Append(catalog, row) < 0) {
            Py_DECREF(row);
            goto done;
        }
        Py_DECREF(row);
    }
    if (nsets) {
        if (put_leb128(&out, 4) < 0 || put_leb128(&out, nsets) < 0 || put_head(&out, "org_id", "String") < 0 ||
            put_picked_strings(&out, org, new_rows, nsets) < 0 || put_head(&out, "metric", "String") < 0 ||
            put_picked_strings(&out, metric, new_rows, nsets) < 0 ||
            put_head(&out, "attr_keys", "Array(String)") < 0 || put_picked_arrays(&out, ck, akeys, new_rows, nsets) < 0 ||
            put_head(&out, "attr_values", "Array(String)") < 0 || put_picked_arrays(&out, cv, avals, new_rows, nsets) < 0)
            goto done;
    }
    /* The new (series, hour) pairs of sums, for the attribute-cardinality views. */
    uint64_t nsums = 0;
    for (uint64_t q = 0; q < nsets; q++) {
        Str k = kind[new_rows[q]];
        if (k.n == 3 && !memcmp(k.p, "sum", 3)) new_rows[nsums++] = new_rows[q];
    }
    if (nsums) {
        if (put_leb128(&card, 5) < 0 || put_leb128(&card, nsums) < 0 || put_head(&card, "metric", "String") < 0 ||
            put_picked_strings(&card, metric, new_rows, nsums) < 0 || put_head(&card, "hour", "DateTime('UTC')") < 0)
            goto done;
        for (uint64_t q = 0; q < nsums; q++) {
            int64_t h = hour_of((int64_t)get_u64(b->cells[c_time].a + 8 * new_rows[q]));
            if (put_u32(&card, (uint32_t)(h < 0 ? 0 : h > 0xFFFFFFFFLL ? 0xFFFFFFFFLL : h)) < 0) goto done;
        }
        if (put_head(&card, "org_id", "String") < 0 || put_picked_strings(&card, org, new_rows, nsums) < 0 ||
            put_head(&card, "attr_keys", "Array(String)") < 0 || put_picked_arrays(&card, ck, akeys, new_rows, nsums) < 0 ||
            put_head(&card, "attr_values", "Array(String)") < 0 || put_picked_arrays(&card, cv, avals, new_rows, nsums) < 0)
            goto done;
    }
    sets_block = PyBytes_FromStringAndSize(out.data ? out.data : "", out.len);
    if (!sets_block) goto done;
    card_block = PyBytes_FromStringAndSize(card.data ? card.data : "", card.len);
    if (!card_block) goto done;
    result = Py_BuildValue("(OOOOO)", want_orgs ? orgs : Py_None, catalog, sets_block, keys, card_block);
done:
    PyBuffer_Release(&view);
    PyBuffer_Release(&seen_view);
    Py_XDECREF(orgs);
    Py_XDECREF(catalog);
    Py_XDECREF(keys);
    Py_XDECREF(sets_block);
    Py_XDECREF(card_block);
    table_free(&t_org);
    table_free(&t_cat);
    table_free(&t_set);
    PyMem_Free(b);
    PyMem_Free(org);
    PyMem_Free(metric);
    PyMem_Free(kind);
    PyMem_Free(unit);
    PyMem_Free(akeys);
    PyMem_Free(avals);
    PyMem_Free(first);
    PyMem_Free(last);
    PyMem_Free(count);
    PyMem_Free(cat_last);
    PyMem_Free(cat_count);
    PyMem_Free(cat_unit);
    PyMem_Free(new_rows);
    PyMem_Free(out.data);
    PyMem_Free(card.data);
    return result;
}

/* A row's hash over columns of Python objects: the edge's stream keys and the series limit's set keys. */
static Py_uhash_t mix(Py_uhash_t h, Py_uhash_t v) {
    h ^= v + (Py_uhash_t)0x9E3779B97F4A7C15ULL + (h << 6) + (h >> 2);
    return h * (Py_uhash_t)0xff51afd7ed558ccdULL;
}

/* Row i's hash over columns of Python objects, from `seed`: each cell's hash in order, a list or tuple
 * cell hashed by its items with its length (so the same values give the same hash whichever of the two
 * holds them, and ["a", "b"] + [] differs from ["a"] + ["b"]). Sets *err on a hash error. */
static uint64_t row_hash(PyObject **colv, Py_ssize_t ncols, Py_ssize_t i, uint64_t seed, int *err) {
    Py_uhash_t h = (Py_uhash_t)seed;
    for (Py_ssize_t c = 0; c < ncols; c++) {
        PyObject *cell = PyList_GET_ITEM(colv[c], i);
        if (PyList_Check(cell) || PyTuple_Check(cell)) {
            Py_ssize_t n = PySequence_Fast_GET_SIZE(cell);
            PyObject **items = PySequence_Fast_ITEMS(cell);
            h = mix(h, (Py_uhash_t)n + 0x51ULL);
            for (Py_ssize_t k = 0; k < n; k++) {
                Py_hash_t v = PyObject_Hash(items[k]);
                if (v == -1) {
                    *err = 1;
                    return 0;
                }
                h = mix(h, (Py_uhash_t)v);
            }
        } else {
            Py_hash_t v = PyObject_Hash(cell);
            if (v == -1) {
                *err = 1;
                return 0;
            }
            h = mix(h, (Py_uhash_t)v);
        }
    }
    return (uint64_t)h;
}

/* Each row's key over `columns` (lists of equal length): the hash of its cells in order, a list or tuple
 * cell hashed by its items with its length, so that the same values give the same key whichever of the
 * two holds them. Process-local (it mixes Python's string hashes). The series limit's key of an
 * (org, metric, attribute set) (collector/series.py): one call a request, not three tuples a point. */
static PyObject *row_keys(PyObject *self, PyObject *args) {
    PyObject *columns;
    if (!PyArg_ParseTuple(args, "O", &columns)) return NULL;
    PyObject *cols = PySequence_Fast(columns, "columns must be a sequence of lists");
    if (!cols) return NULL;
    Py_ssize_t ncols = PySequence_Fast_GET_SIZE(cols);
    PyObject **colv = PySequence_Fast_ITEMS(cols);
    PyObject *out = NULL;
    Py_ssize_t rows = 0;
    for (Py_ssize_t c = 0; c < ncols; c++) {
        if (!PyList_Check(colv[c]) || (c && PyList_GET_SIZE(colv[c]) != rows)) {
            PyErr_SetString(PyExc_ValueError, "every column must be a list, all of one length");
            goto done;
        }
        rows = PyList_GET_SIZE(colv[c]);
    }
    out = PyList_New(rows);
    if (!out) goto done;
    for (Py_ssize_t i = 0; i < rows; i++) {
        int err = 0;
        uint64_t h = row_hash(colv, ncols, i, 0x3c6ef372fe94f82bULL, &err);
        if (err) goto fail;
        PyObject *key = PyLong_FromUnsignedLongLong((unsigned long long)h);
        if (!key) goto fail;
        PyList_SET_ITEM(out, i, key);
    }
    goto done;
fail:
    Py_CLEAR(out);
done:
    Py_DECREF(cols);
    return out;
}


/* The n-th smallest (0-based) of a[0..n), reordering a: Hoare's selection, linear on average. */
static long long select_nth(long long *a, Py_ssize_t n, Py_ssize_t k) {
    Py_ssize_t lo = 0, hi = n - 1;
    while (lo < hi) {
        long long pivot = a[lo + (hi - lo) / 2];
        Py_ssize_t i = lo, j = hi;
        while (i <= j) {
            while (a[i] < pivot) i++;
            while (a[j] > pivot) j--;
            if (i <= j) {
                long long tmp = a[i];
                a[i] = a[j];
                a[j] = tmp;
                i++;
                j--;
            }
        }
        if (k <= j) hi = j;
        else if (k >= i) lo = i;
        else return a[k];
    }
    return a[k];
}

/* The edge's stream table (collector/identity.py, EdgeIdentity): a caller's bytearray of 16-byte slots
 * (a power of two of them), each a stream's key (its row hash, never 0: 0 is an empty slot) and the
 * greatest time it has shown, as two little-endian uint64s; open addressing, linear probing. No Python
 * object per stream: about 23 bytes a stream at the table's 70% load, against about 100 for a dict of
 * ints, and no pointer to follow when it is scanned. */
static int stream_table_view(PyObject *table, Py_buffer *view, uint64_t *slots) {
    if (PyObject_GetBuffer(table, view, PyBUF_WRITABLE) < 0) return -1;
    uint64_t n = (uint64_t)view->len / 16;
    if (view->len % 16 || n == 0 || (n & (n - 1))) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "the table must be a power of two of 16-byte slots");
        return -1;
    }
    *slots = n;
    return 0;
}

/* stream_table_marks(columns, times, table, floor, room) -> (flags, verify, added, refused): each row
 * new (0) when its time is after the floor and after the time its stream's slot holds (the slot is
 * raised, or taken for a stream not held), to verify (1) otherwise. At most `room` streams are added (the
 * caller keeps the table at most 70% full): a row of a new stream past it is marked to verify, and
 * `refused` is the greatest time of such a row (0: none), to which the caller raises the floor, since
 * the table does not remember it (a copy of that point must not pass for new once room is made). */
static PyObject *stream_table_marks(PyObject *self, PyObject *args) {
    PyObject *columns, *times, *table;
    unsigned long long floor;
    Py_ssize_t room;
    if (!PyArg_ParseTuple(args, "OOOKn", &columns, &times, &table, &floor, &room)) return NULL;
    PyObject *cols = PySequence_Fast(columns, "columns must be a sequence of lists");
    if (!cols) return NULL;
    Py_ssize_t ncols = PySequence_Fast_GET_SIZE(cols);
    PyObject **colv = PySequence_Fast_ITEMS(cols);
    PyObject *result = NULL, *flags = NULL;
    Py_buffer view;
    uint64_t slots;
    if (stream_table_view(table, &view, &slots) < 0) {
        Py_DECREF(cols);
        return NULL;
    }
    unsigned char *tb = view.buf;
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
    Py_ssize_t verify = 0, added = 0;
    unsigned long long refused = 0;
    uint64_t mask = slots - 1;
    for (Py_ssize_t i = 0; i < rows; i++) {
        int err = 0;
        uint64_t key = row_hash(colv, ncols, i, 0x27d4eb2f165667c5ULL, &err) | 1; /* 0: an empty slot */
        if (err) goto done;
        unsigned long long t = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(times, i));
        if (t == (unsigned long long)-1 && PyErr_Occurred()) goto done;
        uint64_t s = (key * 0x9E3779B97F4A7C15ULL) >> 7 & mask;
        for (;;) {
            uint64_t k = get_u64(tb + 16 * s);
            if (k == key) {
                uint64_t seen = get_u64(tb + 16 * s + 8);
                if (t > floor && t > seen) {
                    put_u64_at(tb + 16 * s + 8, t);
                    fv[i] = 0;
                } else {
                    fv[i] = 1;
                    verify++;
                }
                break;
            }
            if (k == 0) {
                if (t > floor && added < room) {
                    put_u64_at(tb + 16 * s, key);
                    put_u64_at(tb + 16 * s + 8, t);
                    added++;
                    fv[i] = 0;
                } else {
                    if (t > floor && t > refused) refused = t;
                    fv[i] = 1;
                    verify++;
                }
                break;
            }
            s = (s + 1) & mask;
        }
    }
    result = Py_BuildValue("(OnnK)", flags, verify, added, refused);
done:
    PyBuffer_Release(&view);
    Py_XDECREF(flags);
    Py_DECREF(cols);
    return result;
}

/* stream_table_evict(table, n) -> (bound, count): forget at least n streams, those with the oldest
 * times and every one tied with the n-th (all when fewer are held), rebuilding the table from those
 * left; `bound` is the greatest time forgotten (None when nothing was), `count` the streams left. */
#define SIGN 0x8000000000000000ULL /* flipped, unsigned order becomes signed order */

static PyObject *stream_table_evict(PyObject *self, PyObject *args) {
    PyObject *table;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "On", &table, &n)) return NULL;
    Py_buffer view;
    uint64_t slots;
    if (stream_table_view(table, &view, &slots) < 0) return NULL;
    unsigned char *tb = view.buf;
    PyObject *result = NULL;
    long long *times = NULL;
    unsigned char *copy = NULL;
    Py_ssize_t count = 0;
    for (uint64_t s = 0; s < slots; s++) count += get_u64(tb + 16 * s) != 0;
    if (n <= 0 || count == 0) {
        PyBuffer_Release(&view);
        return Py_BuildValue("(On)", Py_None, count);
    }
    if (n > count) n = count;
    times = PyMem_Malloc((size_t)count * sizeof(long long));
    copy = PyMem_Malloc((size_t)view.len);
    if (!times || !copy) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t i = 0;
    for (uint64_t s = 0; s < slots; s++)
        if (get_u64(tb + 16 * s)) times[i++] = (long long)(get_u64(tb + 16 * s + 8) ^ SIGN); /* order kept */
    long long bound_signed = select_nth(times, count, n - 1);
    memcpy(copy, tb, (size_t)view.len);
    memset(tb, 0, (size_t)view.len);
    uint64_t mask = slots - 1, bound = 0;
    Py_ssize_t left = 0;
    for (uint64_t s = 0; s < slots; s++) {
        uint64_t key = get_u64(copy + 16 * s), t = get_u64(copy + 16 * s + 8);
        if (!key) continue;
        if ((long long)(t ^ SIGN) <= bound_signed) {
            if (t > bound) bound = t;
            continue;
        }
        uint64_t d = (key * 0x9E3779B97F4A7C15ULL) >> 7 & mask;
        while (get_u64(tb + 16 * d)) d = (d + 1) & mask;
        memcpy(tb + 16 * d, copy + 16 * s, 16);
        left++;
    }
    result = Py_BuildValue("(Kn)", (unsigned long long)bound, left);
done:
    PyMem_Free(times);
    PyMem_Free(copy);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"row_keys", row_keys, METH_VARARGS,
     "row_keys(columns) -> list[int]: each row's process-local key over the columns (list cells by items)."},
    {"stream_table_marks", stream_table_marks, METH_VARARGS,
     "stream_table_marks(columns, times, table, floor) -> (flags, verify, added): marks on a stream table."},
    {"stream_table_evict", stream_table_evict, METH_VARARGS,
     "stream_table_evict(table, n) -> (bound | None, count): forget the n oldest streams of a table."},
    {"concat_blocks", concat_blocks, METH_VARARGS,
     "concat_blocks(blocks) -> bytes: Native blocks of the same columns as one block of all their rows."},
    {"split_blocks", split_blocks, METH_VARARGS,
     "split_blocks(data) -> list[int]: where each of several Native blocks one after another ends."},
    {"keyset_add", keyset_add, METH_VARARGS,
     "keyset_add(table, keys) -> int: add group_summary's set keys to a key set (a bytearray)."},
    {"group_summary", group_summary, METH_VARARGS,
     "group_summary(block, seen, orgs) -> (orgs or None, catalog, sets_block, keys, cardinality_block): what "
     "the writer derives from a group's block (org_last_seen, metric_catalog, new (set, hour) pairs)."},
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
