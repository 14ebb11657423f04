/* The fast path of collector/decode.py: an OTLP ExportMetricsServiceRequest (protobuf wire format)
 * straight to the number-point columns, for the requests SDKs and Collectors actually send (delta sums
 * and gauges with string, int or bool attributes).
 *
 * decode_numbers() returns exactly what the Python decoder builds for such a request, or None whenever
 * the request is outside the fast path or the Python decoder would do anything but accept every point
 * (a rejected point, a cumulative sum, a distribution, an attribute value of another type, exemplars,
 * malformed wire format, invalid UTF-8, a singular message or a oneof given twice, a metric name, unit,
 * description or scope over its limit or with a control character, ...). The caller then runs the
 * Python decoder, which handles everything. Correctness first: when in doubt, None.
 *
 * Field numbers: opentelemetry-proto, metrics v1 (collector/metrics/v1, metrics/v1, common/v1,
 * resource/v1).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define OK 0
#define OUT (-1) /* outside the fast path: the caller runs the Python decoder */
#define ERR (-2) /* a Python exception is set */

#define TRY(x)              \
    do {                    \
        int rc_ = (x);      \
        if (rc_ != OK)      \
            return rc_;     \
    } while (0)

/* The columns, in model.BATCH_COLUMNS order (decode.py checks COLUMNS against it at import). */
enum {
    C_ORG, C_METRIC, C_KIND, C_UNIT, C_MONO, C_START, C_TIME, C_ISINT, C_VI, C_VD, C_AK, C_AV,
    C_RK, C_RV, C_SCOPE_NAME, C_SCOPE_VERSION, C_RECEIVED, C_TEMPORALITY, C_SID, C_SSTART, C_CI,
    C_CD, NCOLS
};
static const char *const COLUMN_NAMES[NCOLS] = {
    "org_id", "metric", "kind", "unit", "monotonic", "start_time", "time", "is_int", "value_int",
    "value_double", "attr_keys", "attr_values", "resource_keys", "resource_values", "scope_name",
    "scope_version", "received_at", "temporality", "series_id", "series_start", "cumulative_int",
    "cumulative_double",
};

/* Module-level constant objects (immortal for the module's life). */
static PyObject *S_EMPTY, *S_TRUE, *S_FALSE, *S_SUM, *S_GAUGE, *I_ZERO, *I_ONE, *F_ZERO;

/* ---- wire format ---------------------------------------------------------------------------- */

typedef struct {
    const uint8_t *p;
    const uint8_t *end;
} Rd;

static inline int rd_varint(Rd *r, uint64_t *out)
{
    const uint8_t *p = r->p;
    if (p < r->end && !(*p & 0x80)) { /* one byte: most tags and small lengths */
        *out = *p;
        r->p = p + 1;
        return OK;
    }
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (p >= r->end)
            return OUT;
        uint8_t b = *p++;
        if (shift == 63 && b > 1)
            return OUT;
        v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *out = v;
            r->p = p;
            return OK;
        }
    }
    return OUT;
}

static inline int rd_tag(Rd *r, uint32_t *field, int *wt)
{
    uint64_t t;
    TRY(rd_varint(r, &t));
    if (t > 0xFFFFFFFFu || (t >> 3) == 0)
        return OUT;
    *field = (uint32_t)(t >> 3);
    *wt = (int)(t & 7);
    return OK;
}

static inline int rd_len(Rd *r, Rd *sub)
{
    uint64_t n;
    TRY(rd_varint(r, &n));
    if (n > (uint64_t)(r->end - r->p) || n > 0x7FFFFFFFu)
        return OUT;
    sub->p = r->p;
    sub->end = r->p + n;
    r->p += n;
    return OK;
}

static inline int rd_fixed64(Rd *r, uint64_t *out)
{
    if (r->end - r->p < 8)
        return OUT;
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | r->p[i];
    r->p += 8;
    *out = v;
    return OK;
}

static int skip_field(Rd *r, int wt)
{
    uint64_t v;
    Rd sub;
    switch (wt) {
    case 0:
        return rd_varint(r, &v);
    case 1:
        if (r->end - r->p < 8)
            return OUT;
        r->p += 8;
        return OK;
    case 2:
        return rd_len(r, &sub);
    case 5:
        if (r->end - r->p < 4)
            return OUT;
        r->p += 4;
        return OK;
    default: /* groups: left to protobuf */
        return OUT;
    }
}

/* ---- string interning: bytes of the request → one str object per distinct value ------------- */

typedef struct {
    uint64_t h;
    const uint8_t *p;
    Py_ssize_t n;
    PyObject *s; /* owned by the table */
} Ent;

typedef struct {
    Ent *e;
    size_t cap; /* a power of two */
    size_t used;
} Tab;

/* Python's own keyed hash of bytes (SipHash, seeded per process): the strings come from the network, and
 * an unkeyed hash lets a sender pick strings that all land in one probe chain (a request of such strings
 * takes time quadratic in their number). */
static inline uint64_t hash_bytes(const uint8_t *p, Py_ssize_t n)
{
    uint64_t h = (uint64_t)_Py_HashBytes(p, n);
    return h ? h : 1;
}

/* Double an open-addressing table (linear probing, a power of two) of entries of `size` bytes whose
 * first member is their nonzero hash (0: empty); `first` is the capacity of an empty table's first grow.
 * Both tables of this file (strings, attribute sets) grow through it. */
static int open_grow(void **entries, size_t *capacity, size_t size, size_t first)
{
    size_t old = *capacity, cap = old ? old * 2 : first;
    char *from = *entries, *to = PyMem_Calloc(cap, size);
    if (!to) {
        PyErr_NoMemory();
        return ERR;
    }
    for (size_t i = 0; i < old; i++) {
        uint64_t h;
        memcpy(&h, from + i * size, sizeof h);
        if (!h)
            continue;
        size_t j = h & (cap - 1);
        for (;;) {
            uint64_t taken;
            memcpy(&taken, to + j * size, sizeof taken);
            if (!taken)
                break;
            j = (j + 1) & (cap - 1);
        }
        memcpy(to + j * size, from + i * size, size);
    }
    PyMem_Free(from);
    *entries = to;
    *capacity = cap;
    return OK;
}

_Static_assert(offsetof(Ent, h) == 0, "open_grow reads the hash first");

static int tab_grow(Tab *t)
{
    void *e = t->e;
    int r = open_grow(&e, &t->cap, sizeof(Ent), 1024);
    t->e = e;
    return r;
}

static void tab_free(Tab *t)
{
    for (size_t i = 0; i < t->cap; i++)
        if (t->e[i].h)
            Py_DECREF(t->e[i].s);
    PyMem_Free(t->e);
    t->e = NULL;
    t->cap = t->used = 0;
}

/* A borrowed str for the UTF-8 bytes (owned by the table); OUT when they are not valid UTF-8 (protobuf
 * rejects such a proto3 string: the slow path answers it). */
static int intern(Tab *t, const uint8_t *p, Py_ssize_t n, PyObject **out)
{
    if (n == 0) {
        *out = S_EMPTY;
        return OK;
    }
    if ((t->used + 1) * 2 > t->cap)
        TRY(tab_grow(t));
    uint64_t h = hash_bytes(p, n);
    size_t j = h & (t->cap - 1);
    for (;;) {
        Ent *e = &t->e[j];
        if (!e->h)
            break;
        if (e->h == h && e->n == n && memcmp(e->p, p, (size_t)n) == 0) {
            *out = e->s;
            return OK;
        }
        j = (j + 1) & (t->cap - 1);
    }
    PyObject *s = PyUnicode_DecodeUTF8((const char *)p, n, "strict");
    if (!s) {
        if (PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
            PyErr_Clear();
            return OUT;
        }
        return ERR;
    }
    Ent *e = &t->e[j];
    e->h = h;
    e->p = p;
    e->n = n;
    e->s = s;
    t->used++;
    *out = s;
    return OK;
}

/* ---- one call's state ----------------------------------------------------------------------- */

typedef struct {
    PyObject *k, *v; /* borrowed (table, constants or ctx->keep) */
    const uint8_t *kp, *vp;
    Py_ssize_t kn, vn;
    char num[24];
} Attr;

typedef struct {
    Tab tab;
    PyObject *keep; /* objects that are not interned (int attribute values), kept alive for the call */
    const uint8_t *org_key;
    Py_ssize_t org_key_len;
    long long min_t, max_t;
    Py_ssize_t max_attrs, max_len;
    Py_ssize_t max_name, max_unit, max_scope, max_desc; /* decode.Limits' name limits */
    double max_double; /* schema.MAX_SUM_DOUBLE: the largest magnitude of a double sum point */
    PyObject *received_at;
    PyObject *cols[NCOLS];
    Attr *attrs; /* max_attrs entries */
    int *idx;
    Py_ssize_t points, unattributed, late;
    struct SetTab *sets;
} Ctx;

static inline int append_new(PyObject *list, PyObject *obj)
{
    if (!obj)
        return ERR;
    int rc = PyList_Append(list, obj);
    Py_DECREF(obj);
    return rc ? ERR : OK;
}

static inline int append(PyObject *list, PyObject *obj)
{
    return PyList_Append(list, obj) ? ERR : OK;
}

/* Any string field: validated (and interned) even when its value is not used, as protobuf does. */
static inline int rd_string(Ctx *c, Rd *r, int wt, PyObject **out, const uint8_t **p, Py_ssize_t *n)
{
    Rd s;
    if (wt != 2)
        return OUT;
    TRY(rd_len(r, &s));
    if (p) {
        *p = s.p;
        *n = s.end - s.p;
    }
    return intern(&c->tab, s.p, s.end - s.p, out);
}

/* AnyValue → its text (decode.value_text): string, bool and int only; other kinds are OUT. */
static int parse_any(Ctx *c, Rd r, Attr *a)
{
    int seen = 0;
    while (r.p < r.end) {
        uint32_t f;
        int wt;
        uint64_t v;
        TRY(rd_tag(&r, &f, &wt));
        switch (f) {
        case 1: /* string_value */
            if (seen++)
                return OUT;
            TRY(rd_string(c, &r, wt, &a->v, &a->vp, &a->vn));
            break;
        case 2: /* bool_value */
            if (seen++ || wt != 0)
                return OUT;
            TRY(rd_varint(&r, &v));
            a->v = v ? S_TRUE : S_FALSE;
            a->vp = (const uint8_t *)(v ? "true" : "false");
            a->vn = v ? 4 : 5;
            break;
        case 3: { /* int_value */
            if (seen++ || wt != 0)
                return OUT;
            TRY(rd_varint(&r, &v));
            int len = snprintf(a->num, sizeof a->num, "%lld", (long long)(int64_t)v);
            PyObject *s = PyUnicode_FromStringAndSize(a->num, len);
            if (!s || PyList_Append(c->keep, s)) {
                Py_XDECREF(s);
                return ERR;
            }
            Py_DECREF(s);
            a->v = s;
            a->vp = (const uint8_t *)a->num;
            a->vn = len;
            break;
        }
        case 4: case 5: case 6: case 7: case 8: /* double, array, kvlist, bytes, strindex */
            return OUT;
        default:
            TRY(skip_field(&r, wt));
        }
    }
    return OK;
}

static int parse_kv(Ctx *c, Rd r, Attr *a)
{
    int have_value = 0;
    a->k = a->v = S_EMPTY;
    a->kp = a->vp = (const uint8_t *)"";
    a->kn = a->vn = 0;
    while (r.p < r.end) {
        uint32_t f;
        int wt;
        TRY(rd_tag(&r, &f, &wt));
        if (f == 1) {
            TRY(rd_string(c, &r, wt, &a->k, &a->kp, &a->kn));
        } else if (f == 2) {
            Rd s;
            if (wt != 2 || have_value++)
                return OUT;
            TRY(rd_len(&r, &s));
            TRY(parse_any(c, s, a));
        } else if (f == 3) { /* key_strindex (profiles) */
            return OUT;
        } else {
            TRY(skip_field(&r, wt));
        }
    }
    return OK;
}

static inline int cmp_bytes(const uint8_t *a, Py_ssize_t an, const uint8_t *b, Py_ssize_t bn)
{
    /* UTF-8 byte order is code point order, which is Python's str order. */
    int r = memcmp(a, b, (size_t)(an < bn ? an : bn));
    if (r)
        return r;
    return an < bn ? -1 : an > bn;
}

static inline int is_org(Ctx *c, const Attr *a)
{
    return a->kn == c->org_key_len && memcmp(a->kp, c->org_key, (size_t)a->kn) == 0;
}

static inline int too_long(Ctx *c, const Attr *a)
{
    return PyUnicode_GET_LENGTH(a->k) > c->max_len || PyUnicode_GET_LENGTH(a->v) > c->max_len;
}

/* A string field's text: its object (interned) and its UTF-8 bytes, the last occurrence in the message
 * (protobuf's rule for a repeated singular field). */
typedef struct {
    PyObject *s;
    const uint8_t *p;
    Py_ssize_t n;
} Text;

#define EMPTY_TEXT(t) ((t).s = S_EMPTY, (t).p = (const uint8_t *)"", (t).n = 0)

/* decode._bad_name: longer than max_len characters, or a control character (U+0000-U+001F, U+007F). In
 * UTF-8 these are exactly the bytes below 0x20 and 0x7F: every byte of a multi-byte sequence is >= 0x80. */
static int bad_name(const Text *t, Py_ssize_t max_len)
{
    if (PyUnicode_GET_LENGTH(t->s) > max_len)
        return 1;
    for (Py_ssize_t i = 0; i < t->n; i++)
        if (t->p[i] < 0x20 || t->p[i] == 0x7F)
            return 1;
    return 0;
}

/* Stable insertion sort of idx[0..n) by key (and by value too when by_value). */
static void sort_attrs(const Attr *attrs, int *idx, Py_ssize_t n, int by_value)
{
    for (Py_ssize_t i = 1; i < n; i++) {
        int x = idx[i];
        const Attr *ax = &attrs[x];
        Py_ssize_t j = i;
        while (j > 0) {
            const Attr *ay = &attrs[idx[j - 1]];
            int r = cmp_bytes(ay->kp, ay->kn, ax->kp, ax->kn);
            if (r == 0 && by_value)
                r = cmp_bytes(ay->vp, ay->vn, ax->vp, ax->vn);
            if (r <= 0)
                break;
            idx[j] = idx[j - 1];
            j--;
        }
        idx[j] = x;
    }
}

static int lists_from(const Attr *attrs, const int *idx, Py_ssize_t n, PyObject **keys, PyObject **values)
{
    PyObject *k = PyList_New(n), *v = PyList_New(n);
    if (!k || !v) {
        Py_XDECREF(k);
        Py_XDECREF(v);
        return ERR;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        const Attr *a = &attrs[idx[i]];
        Py_INCREF(a->k);
        PyList_SET_ITEM(k, i, a->k);
        Py_INCREF(a->v);
        PyList_SET_ITEM(v, i, a->v);
    }
    /* Lists of str only cannot be part of a reference cycle: the cyclic GC need not traverse them (it
     * would, at every collection, for each of the millions of rows a full spool queue can hold). */
    PyObject_GC_UnTrack(k);
    PyObject_GC_UnTrack(v);
    *keys = k;
    *values = v;
    return OK;
}

/* One pair of lists per distinct attribute set in a request, shared by its rows (the strings are
 * interned, so equal sets are equal pointers). Nothing downstream changes a row's lists in place: the
 * series limit replaces them (series.py). */
typedef struct {
    uint64_t h;
    PyObject *keys, *values; /* owned by the table */
} SetEnt;

typedef struct SetTab {
    SetEnt *e;
    size_t cap, used;
} SetTab;

_Static_assert(offsetof(SetEnt, h) == 0, "open_grow reads the hash first");

static int set_grow(SetTab *t)
{
    void *e = t->e;
    int r = open_grow(&e, &t->cap, sizeof(SetEnt), 256);
    t->e = e;
    return r;
}

static void set_free(SetTab *t)
{
    for (size_t i = 0; i < t->cap; i++) {
        if (t->e[i].h) {
            Py_DECREF(t->e[i].keys);
            Py_DECREF(t->e[i].values);
        }
    }
    PyMem_Free(t->e);
    t->e = NULL;
    t->cap = t->used = 0;
}

static inline uint64_t mix64(uint64_t h)
{
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return h;
}

/* Borrowed lists (owned by the set table) for the attribute set idx[0..n) of attrs. */
static int attr_lists(SetTab *t, const Attr *attrs, const int *idx, Py_ssize_t n, PyObject **keys,
                      PyObject **values)
{
    if ((t->used + 1) * 2 > t->cap)
        TRY(set_grow(t));
    uint64_t h = (uint64_t)n;
    for (Py_ssize_t i = 0; i < n; i++) {
        const Attr *a = &attrs[idx[i]];
        h = mix64(h ^ (uint64_t)(uintptr_t)a->k);
        h = mix64(h ^ (uint64_t)(uintptr_t)a->v);
    }
    h = h ? h : 1;
    size_t j = h & (t->cap - 1);
    for (;;) {
        SetEnt *e = &t->e[j];
        if (!e->h)
            break;
        if (e->h == h && PyList_GET_SIZE(e->keys) == n) {
            Py_ssize_t i = 0;
            while (i < n && PyList_GET_ITEM(e->keys, i) == attrs[idx[i]].k &&
                   PyList_GET_ITEM(e->values, i) == attrs[idx[i]].v)
                i++;
            if (i == n) {
                *keys = e->keys;
                *values = e->values;
                return OK;
            }
        }
        j = (j + 1) & (t->cap - 1);
    }
    TRY(lists_from(attrs, idx, n, keys, values));
    SetEnt *e = &t->e[j];
    e->h = h;
    e->keys = *keys;
    e->values = *values;
    t->used++;
    return OK;
}

/* ---- the walk ------------------------------------------------------------------------------- */

typedef struct {
    PyObject *keys, *values, *org; /* keys/values owned by the caller of parse_resource; org borrowed */
} Res;

typedef struct {
    PyObject *name, *version;
    int bad; /* the name or version breaks a rule: every point of the scope would be rejected */
} Scope;

static int parse_point(Ctx *c, Rd r, int check_finite, int mono, PyObject *res_org)
{
    uint64_t start = 0, t = 0, raw = 0;
    int vkind = 0; /* 4: as_double, 6: as_int */
    Py_ssize_t n = 0;
    while (r.p < r.end) {
        uint32_t f;
        int wt;
        TRY(rd_tag(&r, &f, &wt));
        switch (f) {
        case 2:
            if (wt != 1)
                return OUT;
            TRY(rd_fixed64(&r, &start));
            break;
        case 3:
            if (wt != 1)
                return OUT;
            TRY(rd_fixed64(&r, &t));
            break;
        case 4: case 6:
            if (wt != 1 || vkind)
                return OUT;
            vkind = (int)f;
            TRY(rd_fixed64(&r, &raw));
            break;
        case 7: {
            Rd s;
            if (wt != 2 || n >= c->max_attrs)
                return OUT;
            TRY(rd_len(&r, &s));
            TRY(parse_kv(c, s, &c->attrs[n]));
            n++;
            break;
        }
        case 8: /* flags */
            if (wt != 0)
                return OUT;
            TRY(skip_field(&r, wt));
            break;
        case 5: /* exemplars */
            return OUT;
        default:
            TRY(skip_field(&r, wt));
        }
    }
    if (t == 0 || t > (uint64_t)INT64_MAX || (long long)t < c->min_t || (long long)t > c->max_t)
        return OUT;
    int64_t vi = 0;
    double vd = 0.0;
    if (vkind == 6) {
        memcpy(&vi, &raw, 8);
        if (mono && vi < 0)
            return OUT;
    } else if (vkind == 4) {
        memcpy(&vd, &raw, 8);
        if (check_finite && !(fabs(vd) <= c->max_double)) /* NaN, ±Inf or beyond the bound */
            return OUT;
        if (mono && vd < 0)
            return OUT;
    } else {
        return OUT;
    }
    /* Attributes: the org taken out (the last one wins), the rest sorted by key, a repeated key's last
     * value kept. */
    PyObject *org = res_org;
    Py_ssize_t m = 0;
    Attr *attrs = c->attrs;
    int *idx = c->idx;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (too_long(c, &attrs[i]))
            return OUT;
        if (is_org(c, &attrs[i]))
            org = attrs[i].v;
        else
            idx[m++] = (int)i;
    }
    sort_attrs(attrs, idx, m, 0);
    Py_ssize_t w = 0;
    for (Py_ssize_t i = 0; i < m; i++) {
        if (i + 1 < m) {
            const Attr *a = &attrs[idx[i]], *b = &attrs[idx[i + 1]];
            if (a->kn == b->kn && memcmp(a->kp, b->kp, (size_t)a->kn) == 0)
                continue; /* a later one of the same key follows */
        }
        idx[w++] = idx[i];
    }
    PyObject *keys, *values;
    TRY(attr_lists(c->sets, attrs, idx, w, &keys, &values));
    if (start > t) {
        start = t;
        c->late++;
    }
    if (PyUnicode_GET_LENGTH(org) == 0)
        c->unattributed++;
    PyObject **cols = c->cols;
    TRY(append(cols[C_AK], keys));
    TRY(append(cols[C_AV], values));
    TRY(append(cols[C_ORG], org));
    TRY(append_new(cols[C_START], PyLong_FromUnsignedLongLong(start)));
    TRY(append_new(cols[C_TIME], PyLong_FromUnsignedLongLong(t)));
    if (vkind == 6) {
        TRY(append(cols[C_ISINT], I_ONE));
        TRY(append_new(cols[C_VI], PyLong_FromLongLong(vi)));
        TRY(append(cols[C_VD], F_ZERO));
    } else {
        TRY(append(cols[C_ISINT], I_ZERO));
        TRY(append(cols[C_VI], I_ZERO));
        TRY(append_new(cols[C_VD], PyFloat_FromDouble(vd)));
    }
    c->points++;
    return OK;
}

static int fill(PyObject *list, PyObject *value, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        TRY(append(list, value));
    return OK;
}

static int parse_metric(Ctx *c, Rd r, const Res *res, const Scope *scope)
{
    Text name, desc, unit;
    EMPTY_TEXT(name);
    EMPTY_TEXT(desc);
    EMPTY_TEXT(unit);
    int which = 0;
    Rd data = {NULL, NULL};
    while (r.p < r.end) {
        uint32_t f;
        int wt;
        TRY(rd_tag(&r, &f, &wt));
        switch (f) {
        case 1:
            TRY(rd_string(c, &r, wt, &name.s, &name.p, &name.n));
            break;
        case 2:
            TRY(rd_string(c, &r, wt, &desc.s, &desc.p, &desc.n));
            break;
        case 3:
            TRY(rd_string(c, &r, wt, &unit.s, &unit.p, &unit.n));
            break;
        case 5: case 7:
            if (wt != 2 || which)
                return OUT;
            which = (int)f;
            TRY(rd_len(&r, &data));
            break;
        case 9: case 10: case 11: case 12: /* distributions, metadata */
            return OUT;
        default:
            TRY(skip_field(&r, wt));
        }
    }
    if (!which)
        return OK; /* no data: no points to store or reject (as the Python decoder) */
    int mono = 0;
    PyObject *kind = S_GAUGE, *temporality = I_ZERO;
    if (which == 7) {
        uint64_t v, agg = 0;
        Rd s = data;
        kind = S_SUM;
        while (s.p < s.end) {
            uint32_t f;
            int wt;
            TRY(rd_tag(&s, &f, &wt));
            if (f == 2 || f == 3) {
                if (wt != 0)
                    return OUT;
                TRY(rd_varint(&s, &v));
                if (f == 2)
                    agg = v;
                else
                    mono = v != 0;
            } else if (f == 1 && wt != 2) {
                return OUT;
            } else {
                TRY(skip_field(&s, wt));
            }
        }
        if (agg != 1) /* only delta sums: cumulative ones need the conversion state */
            return OUT;
        temporality = I_ONE;
    }
    Py_ssize_t before = c->points;
    while (data.p < data.end) {
        uint32_t f;
        int wt;
        TRY(rd_tag(&data, &f, &wt));
        if (f == 1) {
            Rd s;
            if (wt != 2)
                return OUT;
            TRY(rd_len(&data, &s));
            TRY(parse_point(c, s, which == 7, mono, res->org));
        } else if (which == 7 && (f == 2 || f == 3)) {
            TRY(skip_field(&data, wt));
        } else {
            TRY(skip_field(&data, wt));
        }
    }
    Py_ssize_t n = c->points - before;
    if (!n)
        return OK;
    /* The Python decoder rejects every point of such a metric (invalid_name); one without points it
     * accepts, as above. */
    if (scope->bad || bad_name(&name, c->max_name) || bad_name(&unit, c->max_unit) ||
        PyUnicode_GET_LENGTH(desc.s) > c->max_desc)
        return OUT;
    PyObject **cols = c->cols;
    TRY(fill(cols[C_SID], I_ZERO, n));
    TRY(fill(cols[C_SSTART], I_ZERO, n));
    TRY(fill(cols[C_CI], I_ZERO, n));
    TRY(fill(cols[C_CD], F_ZERO, n));
    TRY(fill(cols[C_METRIC], name.s, n));
    TRY(fill(cols[C_KIND], kind, n));
    TRY(fill(cols[C_UNIT], unit.s, n));
    TRY(fill(cols[C_MONO], mono ? I_ONE : I_ZERO, n));
    TRY(fill(cols[C_RK], res->keys, n));
    TRY(fill(cols[C_RV], res->values, n));
    TRY(fill(cols[C_SCOPE_NAME], scope->name, n));
    TRY(fill(cols[C_SCOPE_VERSION], scope->version, n));
    TRY(fill(cols[C_RECEIVED], c->received_at, n));
    TRY(fill(cols[C_TEMPORALITY], temporality, n));
    return OK;
}

static int parse_scope(Ctx *c, Rd r, Scope *scope)
{
    Text name, version;
    EMPTY_TEXT(name);
    EMPTY_TEXT(version);
    while (r.p < r.end) {
        uint32_t f;
        int wt;
        TRY(rd_tag(&r, &f, &wt));
        if (f == 1) {
            TRY(rd_string(c, &r, wt, &name.s, &name.p, &name.n));
        } else if (f == 2) {
            TRY(rd_string(c, &r, wt, &version.s, &version.p, &version.n));
        } else if (f == 3) { /* scope attributes */
            return OUT;
        } else if (f == 4 && wt != 0) {
            return OUT;
        } else {
            TRY(skip_field(&r, wt));
        }
    }
    scope->name = name.s;
    scope->version = version.s;
    scope->bad = bad_name(&name, c->max_scope) || bad_name(&version, c->max_scope);
    return OK;
}

static int parse_scope_metrics(Ctx *c, Rd r, const Res *res)
{
    Scope scope = {S_EMPTY, S_EMPTY, 0};
    PyObject *ignored;
    int have_scope = 0;
    Rd first = r;
    /* The scope first, wherever it is in the message. */
    while (r.p < r.end) {
        uint32_t f;
        int wt;
        TRY(rd_tag(&r, &f, &wt));
        if (f == 1) {
            Rd s;
            if (wt != 2 || have_scope++)
                return OUT;
            TRY(rd_len(&r, &s));
            TRY(parse_scope(c, s, &scope));
        } else if (f == 3) {
            TRY(rd_string(c, &r, wt, &ignored, NULL, NULL));
        } else if (f == 2 && wt != 2) {
            return OUT;
        } else {
            TRY(skip_field(&r, wt));
        }
    }
    r = first;
    while (r.p < r.end) {
        uint32_t f;
        int wt;
        TRY(rd_tag(&r, &f, &wt));
        if (f == 2) {
            Rd s;
            TRY(rd_len(&r, &s));
            TRY(parse_metric(c, s, res, &scope));
        } else {
            TRY(skip_field(&r, wt));
        }
    }
    return OK;
}

/* Resource attributes → sorted (key, value) lists, the org kept among them (decode.resource_columns). */
static int parse_resource(Ctx *c, Rd r, Res *res)
{
    Py_ssize_t n = 0;
    while (r.p < r.end) {
        uint32_t f;
        int wt;
        TRY(rd_tag(&r, &f, &wt));
        if (f == 1) {
            Rd s;
            if (wt != 2 || n >= c->max_attrs)
                return OUT;
            TRY(rd_len(&r, &s));
            TRY(parse_kv(c, s, &c->attrs[n]));
            n++;
        } else if (f == 2 && wt != 0) {
            return OUT;
        } else if (f == 3) { /* entity_refs */
            return OUT;
        } else {
            TRY(skip_field(&r, wt));
        }
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (too_long(c, &c->attrs[i]))
            return OUT;
        c->idx[i] = (int)i;
    }
    sort_attrs(c->attrs, c->idx, n, 1);
    res->org = S_EMPTY;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (is_org(c, &c->attrs[c->idx[i]])) {
            res->org = c->attrs[c->idx[i]].v;
            break;
        }
    }
    return lists_from(c->attrs, c->idx, n, &res->keys, &res->values);
}

static int parse_resource_metrics(Ctx *c, Rd r)
{
    PyObject *ignored;
    Rd resource = {NULL, NULL};
    int have_resource = 0;
    Rd first = r;
    while (r.p < r.end) {
        uint32_t f;
        int wt;
        TRY(rd_tag(&r, &f, &wt));
        if (f == 1) {
            if (wt != 2 || have_resource++)
                return OUT;
            TRY(rd_len(&r, &resource));
        } else if (f == 3) {
            TRY(rd_string(c, &r, wt, &ignored, NULL, NULL));
        } else if (f == 2 && wt != 2) {
            return OUT;
        } else {
            TRY(skip_field(&r, wt));
        }
    }
    Res res = {NULL, NULL, S_EMPTY};
    if (!have_resource)
        resource.p = resource.end = r.end;
    TRY(parse_resource(c, resource, &res));
    int rc = OK;
    r = first;
    while (rc == OK && r.p < r.end) {
        uint32_t f;
        int wt;
        rc = rd_tag(&r, &f, &wt);
        if (rc != OK)
            break;
        if (f == 2) {
            Rd s;
            rc = rd_len(&r, &s);
            if (rc == OK)
                rc = parse_scope_metrics(c, s, &res);
        } else {
            rc = skip_field(&r, wt);
        }
    }
    Py_DECREF(res.keys);
    Py_DECREF(res.values);
    return rc;
}

static int parse_request(Ctx *c, Rd r)
{
    while (r.p < r.end) {
        uint32_t f;
        int wt;
        TRY(rd_tag(&r, &f, &wt));
        if (f == 1) {
            Rd s;
            if (wt != 2)
                return OUT;
            TRY(rd_len(&r, &s));
            TRY(parse_resource_metrics(c, s));
        } else {
            TRY(skip_field(&r, wt));
        }
    }
    return OK;
}

PyDoc_STRVAR(decode_numbers_doc,
"decode_numbers(body, org_key, min_t, max_t, max_attrs, max_len, max_name, max_unit, max_scope,\n"
"               max_desc, max_double, received_at)\n"
"--\n\n"
"A serialized ExportMetricsServiceRequest -> (columns, points, unattributed, late_starts), exactly as\n"
"the Python decoder builds them, or None when the request is outside the fast path or any point would\n"
"not be accepted as it is (the caller then runs the Python decoder).");

static PyObject *decode_numbers(PyObject *self, PyObject *args)
{
    Py_buffer body;
    const char *org_key;
    Py_ssize_t org_key_len;
    long long min_t, max_t;
    Py_ssize_t max_attrs, max_len, max_name, max_unit, max_scope, max_desc;
    double max_double;
    PyObject *received_at;
    if (!PyArg_ParseTuple(args, "y*s#LLnnnnnndO:decode_numbers", &body, &org_key, &org_key_len, &min_t,
                          &max_t, &max_attrs, &max_len, &max_name, &max_unit, &max_scope, &max_desc,
                          &max_double, &received_at))
        return NULL;
    Ctx c;
    SetTab sets;
    memset(&c, 0, sizeof c);
    memset(&sets, 0, sizeof sets);
    c.sets = &sets;
    c.org_key = (const uint8_t *)org_key;
    c.org_key_len = org_key_len;
    c.min_t = min_t;
    c.max_t = max_t;
    c.max_attrs = max_attrs < 0 ? 0 : (max_attrs > 1 << 20 ? 1 << 20 : max_attrs);
    c.max_len = max_len;
    c.max_name = max_name;
    c.max_unit = max_unit;
    c.max_scope = max_scope;
    c.max_desc = max_desc;
    c.max_double = max_double;
    c.received_at = received_at;
    PyObject *result = NULL, *dict = NULL;
    int rc = ERR;
    c.keep = PyList_New(0);
    c.attrs = PyMem_Malloc(sizeof(Attr) * (size_t)(c.max_attrs + 1));
    c.idx = PyMem_Malloc(sizeof(int) * (size_t)(c.max_attrs + 1));
    if (!c.keep || !c.attrs || !c.idx) {
        PyErr_NoMemory();
        goto done;
    }
    for (int i = 0; i < NCOLS; i++)
        if (!(c.cols[i] = PyList_New(0)))
            goto done;
    Rd r = {(const uint8_t *)body.buf, (const uint8_t *)body.buf + body.len};
    rc = parse_request(&c, r);
    if (rc == OUT) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    if (rc != OK)
        goto done;
    if (!(dict = PyDict_New()))
        goto done;
    for (int i = 0; i < NCOLS; i++)
        if (PyDict_SetItemString(dict, COLUMN_NAMES[i], c.cols[i]))
            goto done;
    result = Py_BuildValue("(Onnn)", dict, c.points, c.unattributed, c.late);
done:
    Py_XDECREF(dict);
    for (int i = 0; i < NCOLS; i++)
        Py_XDECREF(c.cols[i]);
    tab_free(&c.tab);
    set_free(&sets);
    Py_XDECREF(c.keep);
    PyMem_Free(c.attrs);
    PyMem_Free(c.idx);
    PyBuffer_Release(&body);
    return result;
}

/* ---- what a request costs once decoded, counted without decoding it ------------------------- */

/* A request's decoded size is about its points, its packed numbers (histogram buckets and bounds) and
 * its repeated messages (attributes, array and kvlist elements, exemplars, quantiles, metrics): every one of them can be a byte or two on the wire and tens of bytes in memory
 * once parsed. collector/decode.py weighs the three counts (decoded_cost). */
typedef struct {
    uint64_t points, numbers, values;
} Cost;

/* Deeper values than protobuf parses: the bytes are not a request it would take. */
#define MAX_COST_DEPTH 100

static int cost_any(Rd r, Cost *c, int depth);

/* A KeyValue: the elements nested in its value (field 2). */
static int cost_kv(Rd r, Cost *c, int depth)
{
    uint32_t f;
    int wt;
    while (r.p < r.end) {
        TRY(rd_tag(&r, &f, &wt));
        if (f == 2 && wt == 2) {
            Rd v;
            TRY(rd_len(&r, &v));
            TRY(cost_any(v, c, depth));
        } else {
            TRY(skip_field(&r, wt));
        }
    }
    return OK;
}

/* An AnyValue: every element of its array (field 5) or kvlist (field 6), at every depth. */
static int cost_any(Rd r, Cost *c, int depth)
{
    uint32_t f;
    int wt;
    if (depth > MAX_COST_DEPTH)
        return OUT;
    while (r.p < r.end) {
        TRY(rd_tag(&r, &f, &wt));
        if ((f == 5 || f == 6) && wt == 2) {
            Rd list;
            TRY(rd_len(&r, &list));
            while (list.p < list.end) {
                uint32_t g;
                int gwt;
                TRY(rd_tag(&list, &g, &gwt));
                if (g == 1 && gwt == 2) {
                    Rd e;
                    TRY(rd_len(&list, &e));
                    c->values++;
                    TRY(f == 5 ? cost_any(e, c, depth + 1) : cost_kv(e, c, depth + 1));
                } else {
                    TRY(skip_field(&list, gwt));
                }
            }
        } else {
            TRY(skip_field(&r, wt));
        }
    }
    return OK;
}

/* Attributes (repeated KeyValue `field` of a message): each a value, and what their values nest. */
static int cost_attributes(Rd r, uint32_t field, Cost *c)
{
    uint32_t f;
    int wt;
    while (r.p < r.end) {
        TRY(rd_tag(&r, &f, &wt));
        if (f == field && wt == 2) {
            Rd kv;
            TRY(rd_len(&r, &kv));
            c->values++;
            TRY(cost_kv(kv, c, 1));
        } else {
            TRY(skip_field(&r, wt));
        }
    }
    return OK;
}

/* Elements of a repeated scalar field whose tag was just read: packed (wire type 2) or one. */
static int cost_scalars(Rd *r, int wt, int fixed, Cost *c)
{
    if (wt != 2) {
        c->numbers++;
        return skip_field(r, wt);
    }
    Rd s;
    TRY(rd_len(r, &s));
    if (fixed) {
        c->numbers += (uint64_t)(s.end - s.p) / 8;
    } else {
        for (const uint8_t *p = s.p; p < s.end; p++)
            c->numbers += !(*p & 0x80); /* a varint ends at a byte without the continuation bit */
    }
    return OK;
}

/* An exponential histogram's Buckets: the counts (field 2, varints). */
static int cost_buckets(Rd r, Cost *c)
{
    uint32_t f;
    int wt;
    while (r.p < r.end) {
        TRY(rd_tag(&r, &f, &wt));
        if (f == 2)
            TRY(cost_scalars(&r, wt, 0, c));
        else
            TRY(skip_field(&r, wt));
    }
    return OK;
}

/* One data point of the data message in Metric field `kind` (5 gauge, 7 sum, 9 histogram,
 * 10 exponential histogram, 11 summary). */
static int cost_point(Rd r, uint32_t kind, Cost *c)
{
    uint32_t attrs = kind == 10 ? 1 : kind == 9 ? 9 : 7;
    uint32_t exemplars = kind == 9 ? 8 : kind == 10 ? 11 : kind == 11 ? 0 : 5;
    uint32_t f;
    int wt;
    c->points++;
    while (r.p < r.end) {
        TRY(rd_tag(&r, &f, &wt));
        Rd sub;
        if (f == attrs && wt == 2) {
            TRY(rd_len(&r, &sub));
            c->values++;
            TRY(cost_kv(sub, c, 1));
        } else if (exemplars && f == exemplars && wt == 2) {
            TRY(rd_len(&r, &sub));
            c->values++;
            TRY(cost_attributes(sub, 7, c)); /* its filtered attributes */
        } else if (kind == 9 && (f == 6 || f == 7)) {
            TRY(cost_scalars(&r, wt, 1, c)); /* bucket counts and explicit bounds */
        } else if (kind == 10 && (f == 8 || f == 9) && wt == 2) {
            TRY(rd_len(&r, &sub));
            TRY(cost_buckets(sub, c));
        } else if (kind == 11 && f == 6 && wt == 2) {
            c->values += 2; /* a quantile: a message, then a tuple and two floats in the decoder */
            TRY(skip_field(&r, wt));
        } else {
            TRY(skip_field(&r, wt));
        }
    }
    return OK;
}

/* One Metric: its data points (the repeated field 1 of its data message) and metadata (field 12). */
static int cost_metric(Rd r, Cost *c)
{
    uint32_t f;
    int wt;
    c->values++;
    while (r.p < r.end) {
        TRY(rd_tag(&r, &f, &wt));
        Rd data;
        if (wt == 2 && (f == 5 || f == 7 || f == 9 || f == 10 || f == 11)) {
            TRY(rd_len(&r, &data));
            while (data.p < data.end) {
                uint32_t g;
                int gwt;
                TRY(rd_tag(&data, &g, &gwt));
                if (g == 1 && gwt == 2) {
                    Rd dp;
                    TRY(rd_len(&data, &dp));
                    TRY(cost_point(dp, f, c));
                } else {
                    TRY(skip_field(&data, gwt));
                }
            }
        } else if (f == 12 && wt == 2) {
            TRY(rd_len(&r, &data));
            c->values++;
            TRY(cost_kv(data, c, 1));
        } else {
            TRY(skip_field(&r, wt));
        }
    }
    return OK;
}

/* Every length-delimited field of a message, one value each (a string or message protobuf parses). */
static int cost_fields(Rd r, Cost *c)
{
    uint32_t f;
    int wt;
    while (r.p < r.end) {
        TRY(rd_tag(&r, &f, &wt));
        c->values += wt == 2;
        TRY(skip_field(&r, wt));
    }
    return OK;
}

/* A Resource or InstrumentationScope: its attributes (field `attrs`) and, of a resource, its entity
 * references (field 3), each a message of strings (type, id and description keys). */
static int cost_holder(Rd r, uint32_t attrs, Cost *c)
{
    uint32_t f;
    int wt;
    while (r.p < r.end) {
        TRY(rd_tag(&r, &f, &wt));
        Rd sub;
        if (f == attrs && wt == 2) {
            TRY(rd_len(&r, &sub));
            c->values++;
            TRY(cost_kv(sub, c, 1));
        } else if (attrs == 1 && f == 3 && wt == 2) {
            TRY(rd_len(&r, &sub));
            c->values++;
            TRY(cost_fields(sub, c));
        } else {
            TRY(skip_field(&r, wt));
        }
    }
    return OK;
}

/* ScopeMetrics or ResourceMetrics: its scope or resource (field 1, attributes in field `attrs`), and
 * `child` on each of its metrics or scopes (field 2). */
static int cost_level(Rd r, Cost *c, uint32_t attrs, int (*child)(Rd, Cost *))
{
    uint32_t f;
    int wt;
    c->values++;
    while (r.p < r.end) {
        TRY(rd_tag(&r, &f, &wt));
        Rd sub;
        if ((f == 1 || f == 2) && wt == 2) {
            TRY(rd_len(&r, &sub));
            TRY(f == 1 ? cost_holder(sub, attrs, c) : child(sub, c));
        } else {
            TRY(skip_field(&r, wt));
        }
    }
    return OK;
}

static int cost_scope_metrics(Rd r, Cost *c) { return cost_level(r, c, 3, cost_metric); }
static int cost_resource_metrics(Rd r, Cost *c) { return cost_level(r, c, 1, cost_scope_metrics); }

PyDoc_STRVAR(wire_cost_doc,
             "wire_cost(body) -> (points, numbers, values) | None\n\nWhat a protobuf "
             "ExportMetricsServiceRequest holds, read from its wire format without decoding it: data points, "
             "packed numbers (histogram bucket counts and bounds) and repeated messages (attributes, array "
             "and kvlist elements, exemplars, quantiles counted twice, metrics, scopes, resources); None "
             "when the bytes are not such a request.");

static PyObject *wire_cost(PyObject *self, PyObject *args)
{
    Py_buffer body;
    if (!PyArg_ParseTuple(args, "y*", &body))
        return NULL;
    Rd r = {(const uint8_t *)body.buf, (const uint8_t *)body.buf + body.len};
    Cost c = {0, 0, 0};
    int status = OK;
    uint32_t f;
    int wt;
    while (status == OK && r.p < r.end) {
        status = rd_tag(&r, &f, &wt);
        if (status != OK)
            break;
        if (f == 1 && wt == 2) {
            Rd sub;
            status = rd_len(&r, &sub);
            if (status == OK)
                status = cost_resource_metrics(sub, &c);
        } else {
            status = skip_field(&r, wt);
        }
    }
    PyBuffer_Release(&body);
    if (status != OK)
        Py_RETURN_NONE;
    return Py_BuildValue("(KKK)", (unsigned long long)c.points, (unsigned long long)c.numbers,
                         (unsigned long long)c.values);
}

static PyMethodDef methods[] = {
    {"decode_numbers", decode_numbers, METH_VARARGS, decode_numbers_doc},
    {"wire_cost", wire_cost, METH_VARARGS, wire_cost_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_otlpfast",
    "The native fast path of the OTLP metrics decoder (collector/decode.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__otlpfast(void)
{
    if (!S_EMPTY) {
        S_EMPTY = PyUnicode_FromString("");
        S_TRUE = PyUnicode_InternFromString("true");
        S_FALSE = PyUnicode_InternFromString("false");
        S_SUM = PyUnicode_InternFromString("sum");
        S_GAUGE = PyUnicode_InternFromString("gauge");
        I_ZERO = PyLong_FromLong(0);
        I_ONE = PyLong_FromLong(1);
        F_ZERO = PyFloat_FromDouble(0.0);
        if (!S_EMPTY || !S_TRUE || !S_FALSE || !S_SUM || !S_GAUGE || !I_ZERO || !I_ONE || !F_ZERO)
            return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    PyObject *names = PyTuple_New(NCOLS);
    if (!names) {
        Py_DECREF(m);
        return NULL;
    }
    for (int i = 0; i < NCOLS; i++) {
        PyObject *s = PyUnicode_FromString(COLUMN_NAMES[i]);
        if (!s) {
            Py_DECREF(names);
            Py_DECREF(m);
            return NULL;
        }
        PyTuple_SET_ITEM(names, i, s);
    }
    if (PyModule_AddObject(m, "COLUMNS", names)) {
        Py_DECREF(names);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
