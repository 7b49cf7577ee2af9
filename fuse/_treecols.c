/* Decode a tree blob (docs/FORMAT.md section 13) straight into the columns of a DirTable.
 *
 * The pure-Python decoder (DirTable.decode_python in dirs.py) spends most of a cold walk of
 * a large snapshot building one dict, one key and one int object per field of every entry
 * only to copy them into arrays. This reads the msgpack bytes once and writes the columns
 * directly: no Python object per field, only the names and the few per-entry extras
 * (symlink targets, subtree ids, xattrs) become objects.
 *
 * It follows the schema strictly (FORMAT.md: map keys are str, names, targets, ids and
 * xattrs are bin) and ignores the keys it does not know, as readers must; what it accepts,
 * the Python decoders read the same (tests/test_fuse_tables.py checks it on damaged trees).
 * One difference is kept: like the mount's Python decoder (msgpack raw=True) it does not
 * check that str values it ignores (user, group, unknown keys) are valid UTF-8, where
 * kiwi_restore.tree.decode_tree refuses such a tree. msgpack ext values are refused. The checks that
 * need the whole listing (order, safe names) stay in dirs.py, shared by both decoders.
 * Every read is bounds-checked; counts claimed by headers are checked against the bytes
 * left before anything is allocated from them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define ID_SIZE 32
#define TREE_VERSION 1

enum { T_NIL, T_BOOL, T_UINT, T_NINT, T_FLOAT, T_STR, T_BIN, T_ARRAY, T_MAP, T_EXT };

typedef struct {
    const unsigned char *p, *end;
    const char *err; /* first error met; the message of the ValueError raised */
} Reader;

typedef struct {
    int type;
    uint64_t u;                /* T_UINT: value; T_STR/T_BIN/T_EXT: length; T_ARRAY/T_MAP: count */
    int64_t i;                 /* T_NINT: value (< 0) */
    const unsigned char *data; /* T_STR/T_BIN/T_EXT payload */
} Item;

static int fail(Reader *r, const char *msg) {
    if (!r->err) r->err = msg;
    return -1;
}

static uint64_t be(const unsigned char *p, int n) {
    uint64_t v = 0;
    for (int k = 0; k < n; k++) v = (v << 8) | p[k];
    return v;
}

/* Read N big-endian bytes as an unsigned length/count/value. */
static int take(Reader *r, int n, uint64_t *out) {
    if (r->end - r->p < n) return fail(r, "truncated");
    *out = be(r->p, n);
    r->p += n;
    return 0;
}

static int payload(Reader *r, Item *it, int type, uint64_t len) {
    if ((uint64_t)(r->end - r->p) < len) return fail(r, "truncated");
    it->type = type;
    it->u = len;
    it->data = r->p;
    r->p += len;
    return 0;
}

/* Read one msgpack header (and the payload of str, bin and ext). */
static int next(Reader *r, Item *it) {
    uint64_t v;
    if (r->p >= r->end) return fail(r, "truncated");
    unsigned c = *r->p++;
    if (c <= 0x7f) { it->type = T_UINT; it->u = c; return 0; }
    if (c >= 0xe0) { it->type = T_NINT; it->i = (int8_t)c; return 0; }
    if (c <= 0x8f) { it->type = T_MAP; it->u = c & 0x0f; return 0; }
    if (c <= 0x9f) { it->type = T_ARRAY; it->u = c & 0x0f; return 0; }
    if (c <= 0xbf) return payload(r, it, T_STR, c & 0x1f);
    switch (c) {
    case 0xc0: it->type = T_NIL; return 0;
    case 0xc2: case 0xc3: it->type = T_BOOL; it->u = c & 1; return 0;
    case 0xc4: case 0xc5: case 0xc6:
        if (take(r, 1 << (c - 0xc4), &v)) return -1;
        return payload(r, it, T_BIN, v);
    case 0xc7: case 0xc8: case 0xc9:
        if (take(r, 1 << (c - 0xc7), &v)) return -1;
        return fail(r, "msgpack ext type (not in the schema)");
    case 0xca: it->type = T_FLOAT; return take(r, 4, &v);
    case 0xcb: it->type = T_FLOAT; return take(r, 8, &v);
    case 0xcc: case 0xcd: case 0xce: case 0xcf:
        it->type = T_UINT;
        return take(r, 1 << (c - 0xcc), &it->u);
    case 0xd0: case 0xd1: case 0xd2: case 0xd3: {
        int n = 1 << (c - 0xd0);
        if (take(r, n, &v)) return -1;
        int64_t s = n == 8 ? (int64_t)v : (int64_t)(v << (64 - 8 * n)) >> (64 - 8 * n);
        if (s >= 0) { it->type = T_UINT; it->u = (uint64_t)s; }
        else { it->type = T_NINT; it->i = s; }
        return 0;
    }
    case 0xd4: case 0xd5: case 0xd6: case 0xd7: case 0xd8:
        return fail(r, "msgpack ext type (not in the schema)");
    case 0xd9: case 0xda: case 0xdb:
        if (take(r, 1 << (c - 0xd9), &v)) return -1;
        return payload(r, it, T_STR, v);
    case 0xdc: case 0xdd:
        it->type = T_ARRAY;
        return take(r, c == 0xdc ? 2 : 4, &it->u);
    case 0xde: case 0xdf:
        it->type = T_MAP;
        return take(r, c == 0xde ? 2 : 4, &it->u);
    default:
        return fail(r, "invalid msgpack byte 0xc1");
    }
}

#define MAX_DEPTH 64

/* Skip one whole value. Map keys must be str or bin, as msgpack-python (strict_map_key)
 * has them; nesting deeper than MAX_DEPTH is refused rather than followed. */
static int skip_value(Reader *r, int depth) {
    Item it;
    if (depth > MAX_DEPTH) return fail(r, "too deeply nested");
    if (next(r, &it)) return -1;
    if (it.type == T_ARRAY || it.type == T_MAP) {
        /* every value takes at least one byte: a count beyond the bytes left is truncated */
        if (it.u > (uint64_t)(r->end - r->p)) return fail(r, "truncated");
        for (uint64_t j = 0; j < it.u; j++) {
            if (it.type == T_MAP) {
                Item k;
                if (next(r, &k)) return -1;
                if (k.type != T_STR && k.type != T_BIN) return fail(r, "a map key is not str or bin");
            }
            if (skip_value(r, depth + 1)) return -1;
        }
    }
    return 0;
}

static int skip(Reader *r, uint64_t n) {
    while (n--)
        if (skip_value(r, 1)) return -1;
    return 0;
}

/* A container header whose count fits in the bytes left (at least PER bytes per item). */
static int container(Reader *r, Item *it, int type, uint64_t per, const char *what) {
    if (next(r, it)) return -1;
    if (it->type != type) return fail(r, what);
    if (it->u > (uint64_t)(r->end - r->p) / per) return fail(r, "truncated");
    return 0;
}

static int get_i64(Reader *r, const Item *it, int64_t *out, const char *what) {
    if (it->type == T_NINT) { *out = it->i; return 0; }
    if (it->type == T_UINT && it->u <= INT64_MAX) { *out = (int64_t)it->u; return 0; }
    return fail(r, what);
}

static int get_u64(Reader *r, const Item *it, uint64_t *out, const char *what) {
    if (it->type != T_UINT) return fail(r, what);
    *out = it->u;
    return 0;
}

static int get_u32(Reader *r, const Item *it, unsigned int *out, const char *what) {
    if (it->type != T_UINT || it->u > UINT32_MAX) return fail(r, what);
    *out = (unsigned int)it->u;
    return 0;
}

enum { K_OTHER, K_NAME, K_TYPE, K_MODE, K_UID, K_GID, K_MTIME, K_ATIME, K_CTIME, K_SIZE, K_CHUNKS,
       K_TARGET, K_SUBTREE, K_RDEV, K_XATTRS, K_HARDLINK, K_NLINK, K_VERSION, K_ENTRIES };

/* Which schema key a str key is (K_OTHER for one this reader does not know). */
static int key_id(const Item *k) {
    static const struct { const char *s; size_t n; int id; } keys[] = {
        {"uid", 3, K_UID}, {"gid", 3, K_GID}, {"name", 4, K_NAME}, {"type", 4, K_TYPE}, {"mode", 4, K_MODE},
        {"size", 4, K_SIZE}, {"rdev", 4, K_RDEV}, {"mtime", 5, K_MTIME}, {"atime", 5, K_ATIME},
        {"ctime", 5, K_CTIME}, {"nlink", 5, K_NLINK}, {"chunks", 6, K_CHUNKS}, {"target", 6, K_TARGET},
        {"xattrs", 6, K_XATTRS}, {"subtree", 7, K_SUBTREE}, {"version", 7, K_VERSION},
        {"entries", 7, K_ENTRIES}, {"hardlink", 8, K_HARDLINK},
    };
    if (k->type != T_STR) return K_OTHER;
    for (size_t j = 0; j < sizeof keys / sizeof keys[0]; j++)
        if (keys[j].n == k->u && keys[j].s[0] == k->data[0] && memcmp(keys[j].s, k->data, k->u) == 0)
            return keys[j].id;
    return K_OTHER;
}

/* A growable byte buffer for the chunk columns (their count is known only at the end). */
typedef struct { char *buf; size_t len, cap; } Buf;

static int buf_put(Buf *b, const void *src, size_t n) {
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n) cap *= 2;
        char *nb = PyMem_Realloc(b->buf, cap);
        if (!nb) { PyErr_NoMemory(); return -1; }
        b->buf = nb;
        b->cap = cap;
    }
    memcpy(b->buf + b->len, src, n);
    b->len += n;
    return 0;
}

#define HAS(e, key) ((e)->seen & (1u << (key)))
#define REQUIRED ((1u << K_NAME) | (1u << K_TYPE) | (1u << K_MODE) | (1u << K_UID) | (1u << K_GID) | (1u << K_MTIME))

/* One entry's fields, as found in its map (in any key order). */
typedef struct {
    Item name, type, target, subtree;
    const unsigned char *chunks, *xattrs; /* where those values start; parsed once the type is known */
    unsigned seen; /* bit 1 << K_x for each schema key met */
    unsigned int mode, uid, gid, hardlink, nlink;
    int64_t mtime, atime, ctime, size;
    uint64_t rdev;
} Entry;

static int read_entry(Reader *r, Entry *e) {
    Item m, k, v;
    memset(e, 0, sizeof *e);
    e->nlink = 1;
    if (container(r, &m, T_MAP, 2, "an entry is not a map")) return -1;
    for (uint64_t j = 0; j < m.u; j++) {
        if (next(r, &k)) return -1;
        if (k.type != T_STR) return fail(r, "an entry key is not str");
        int id = key_id(&k);
        if (id == K_CHUNKS || id == K_XATTRS) { /* parsed once the entry's type is known */
            *(id == K_CHUNKS ? &e->chunks : &e->xattrs) = r->p;
            if (skip(r, 1)) return -1;
            continue;
        }
        const unsigned char *at = r->p;
        if (next(r, &v)) return -1;
        /* a container for a known key fails its type check below, so returns at once */
        switch (id) {
        case K_NAME:
            if (v.type != T_BIN) return fail(r, "entry name is not bin");
            e->name = v;
            break;
        case K_TYPE:
            if (v.type != T_STR) return fail(r, "entry type is not str");
            e->type = v;
            break;
        case K_MODE:
            if (get_u32(r, &v, &e->mode, "bad mode")) return -1;
            break;
        case K_UID:
            if (get_u32(r, &v, &e->uid, "bad uid")) return -1;
            break;
        case K_GID:
            if (get_u32(r, &v, &e->gid, "bad gid")) return -1;
            break;
        case K_MTIME:
            if (get_i64(r, &v, &e->mtime, "bad mtime")) return -1;
            break;
        case K_ATIME:
            if (get_i64(r, &v, &e->atime, "bad atime")) return -1;
            break;
        case K_CTIME:
            if (get_i64(r, &v, &e->ctime, "bad ctime")) return -1;
            break;
        case K_SIZE:
            if (get_i64(r, &v, &e->size, "bad size")) return -1;
            break;
        case K_TARGET:
            if (v.type != T_BIN) return fail(r, "symlink target is not bin");
            e->target = v;
            break;
        case K_SUBTREE:
            if (v.type != T_BIN || v.u != ID_SIZE) return fail(r, "subtree is not a 32-byte id");
            e->subtree = v;
            break;
        case K_RDEV:
            if (get_u64(r, &v, &e->rdev, "bad rdev")) return -1;
            break;
        case K_HARDLINK:
            if (get_u32(r, &v, &e->hardlink, "bad hardlink")) return -1;
            break;
        case K_NLINK:
            if (get_u32(r, &v, &e->nlink, "bad nlink")) return -1;
            break;
        default: /* a key this reader does not know (user, group, ...): its value is skipped */
            if (v.type == T_ARRAY || v.type == T_MAP) {
                r->p = at;
                if (skip(r, 1)) return -1;
            }
        }
        e->seen |= 1u << id;
    }
    if ((e->seen & REQUIRED) != REQUIRED) return fail(r, "entry lacks a required field");
    if (!HAS(e, K_ATIME)) e->atime = e->mtime;
    if (!HAS(e, K_CTIME)) e->ctime = e->mtime;
    return 0;
}

/* Append a file's chunk list to the chunk columns; its total and allocated sizes out. */
static int read_chunks(Reader *r, const unsigned char *at, Buf *ids, Buf *sizes, int64_t *total, int64_t *used) {
    static const unsigned char hole[ID_SIZE];
    Reader c = {at, r->end, NULL};
    Item list, pair, id, sz;
    int64_t s, neg;
    *total = *used = 0;
    if (container(&c, &list, T_ARRAY, 3, "chunks is not an array")) goto bad;
    for (uint64_t j = 0; j < list.u; j++) {
        if (container(&c, &pair, T_ARRAY, 1, "a chunk is not an array")) goto bad;
        if (pair.u != 2) { fail(&c, "a chunk is not an [id, size] pair"); goto bad; }
        if (next(&c, &id) || next(&c, &sz)) goto bad;
        if (get_i64(&c, &sz, &s, "bad chunk size")) goto bad;
        if (s < 0) { fail(&c, "bad chunk size"); goto bad; }
        if (s > INT64_MAX - *total) { fail(&c, "chunk sizes overflow"); goto bad; }
        *total += s;
        if (id.type == T_NIL) {
            neg = -s - 1; /* a hole of s bytes */
            if (buf_put(ids, hole, ID_SIZE) || buf_put(sizes, &neg, sizeof neg)) return -1;
        } else if (id.type == T_BIN && id.u == ID_SIZE) {
            *used += s;
            if (buf_put(ids, id.data, ID_SIZE) || buf_put(sizes, &s, sizeof s)) return -1;
        } else {
            fail(&c, "bad chunk id");
            goto bad;
        }
    }
    return 0;
bad:
    return fail(r, c.err);
}

static PyObject *read_xattrs(Reader *r, const unsigned char *at) {
    Reader x = {at, r->end, NULL};
    Item m, k, v;
    if (next(&x, &m)) goto bad;
    if (m.type == T_NIL) Py_RETURN_NONE;
    if (m.type != T_MAP) { fail(&x, "xattrs is not a map"); goto bad; }
    if (m.u == 0) Py_RETURN_NONE;
    PyObject *d = PyDict_New();
    if (!d) return NULL;
    for (uint64_t j = 0; j < m.u; j++) {
        if (next(&x, &k) || next(&x, &v)) { Py_DECREF(d); goto bad; }
        if (k.type != T_BIN || v.type != T_BIN) { Py_DECREF(d); fail(&x, "xattr name or value is not bin"); goto bad; }
        PyObject *kb = PyBytes_FromStringAndSize((const char *)k.data, (Py_ssize_t)k.u);
        PyObject *vb = kb ? PyBytes_FromStringAndSize((const char *)v.data, (Py_ssize_t)v.u) : NULL;
        int rc = vb ? PyDict_SetItem(d, kb, vb) : -1;
        Py_XDECREF(kb);
        Py_XDECREF(vb);
        if (rc) { Py_DECREF(d); return NULL; }
    }
    return d;
bad:
    fail(r, x.err);
    return NULL;
}

static unsigned int ifmt(const Item *type) {
    if (type->u != 1) return 0;
    switch (type->data[0]) {
    case 'f': return 0100000;
    case 'd': return 0040000;
    case 'l': return 0120000;
    case 'p': return 0010000;
    case 'c': return 0020000;
    case 'b': return 0060000;
    case 's': return 0140000;
    default: return 0;
    }
}

/* Set a Python int into dict D under key I (the entry index). */
static int put_indexed(PyObject *d, Py_ssize_t i, PyObject *value) {
    if (!value) return -1;
    PyObject *key = PyLong_FromSsize_t(i);
    int rc = key ? PyDict_SetItem(d, key, value) : -1;
    Py_XDECREF(key);
    Py_DECREF(value);
    return rc;
}

#define N_COLUMNS 13 /* mode nlink uid gid size alloc rdev atime mtime ctime hardlink cstart ccount */

/* What the entries become: the Python objects handed back and the chunk columns. */
typedef struct {
    PyObject *names, *targets, *subtrees, *xattrs, *col[N_COLUMNS];
    Buf ids, sizes;
} Columns;

static void columns_clear(Columns *o) {
    for (int c = 0; c < N_COLUMNS; c++) Py_CLEAR(o->col[c]);
    Py_CLEAR(o->names);
    Py_CLEAR(o->targets);
    Py_CLEAR(o->subtrees);
    Py_CLEAR(o->xattrs);
    PyMem_Free(o->ids.buf);
    PyMem_Free(o->sizes.buf);
    o->ids = o->sizes = (Buf){0};
}

/* Read the entries array at r->p into O (which is cleared on failure). */
static int read_entries(Reader *r, Columns *o) {
    static const size_t width[N_COLUMNS] = {4, 4, 4, 4, 8, 8, 8, 8, 8, 8, 4, 4, 4};
    Item list;
    /* 38 bytes: the six required keys and their shortest values, so the columns allocated
     * from the count stay within about twice the input */
    if (container(r, &list, T_ARRAY, 38, "entries is not an array")) return -1;
    Py_ssize_t n = (Py_ssize_t)list.u;
    for (int c = 0; c < N_COLUMNS; c++)
        if (!(o->col[c] = PyBytes_FromStringAndSize(NULL, n * (Py_ssize_t)width[c]))) goto fail;
    unsigned int *mode = (unsigned int *)PyBytes_AS_STRING(o->col[0]);
    unsigned int *nlink = (unsigned int *)PyBytes_AS_STRING(o->col[1]);
    unsigned int *uid = (unsigned int *)PyBytes_AS_STRING(o->col[2]);
    unsigned int *gid = (unsigned int *)PyBytes_AS_STRING(o->col[3]);
    long long *size = (long long *)PyBytes_AS_STRING(o->col[4]);
    long long *alloc = (long long *)PyBytes_AS_STRING(o->col[5]);
    unsigned long long *rdev = (unsigned long long *)PyBytes_AS_STRING(o->col[6]);
    long long *atime = (long long *)PyBytes_AS_STRING(o->col[7]);
    long long *mtime = (long long *)PyBytes_AS_STRING(o->col[8]);
    long long *ctime = (long long *)PyBytes_AS_STRING(o->col[9]);
    unsigned int *hardlink = (unsigned int *)PyBytes_AS_STRING(o->col[10]);
    unsigned int *cstart = (unsigned int *)PyBytes_AS_STRING(o->col[11]);
    unsigned int *ccount = (unsigned int *)PyBytes_AS_STRING(o->col[12]);
    if (!(o->names = PyList_New(n)) || !(o->targets = PyDict_New()) || !(o->subtrees = PyDict_New())
        || !(o->xattrs = PyDict_New()))
        goto fail;

    for (Py_ssize_t i = 0; i < n; i++) {
        Entry e;
        if (read_entry(r, &e)) goto fail;
        unsigned int fmt = ifmt(&e.type);
        if (!fmt) { fail(r, "unknown entry type"); goto fail; }
        PyObject *name = PyBytes_FromStringAndSize((const char *)e.name.data, (Py_ssize_t)e.name.u);
        if (!name) goto fail;
        PyList_SET_ITEM(o->names, i, name);
        mode[i] = fmt | e.mode;
        nlink[i] = e.nlink;
        uid[i] = e.uid;
        gid[i] = e.gid;
        atime[i] = e.atime;
        mtime[i] = e.mtime;
        ctime[i] = e.ctime;
        hardlink[i] = e.hardlink;
        size[i] = alloc[i] = 0;
        rdev[i] = 0;
        cstart[i] = ccount[i] = 0;
        char t = (char)e.type.data[0];
        if (t == 'f') {
            int64_t total, used;
            size_t before = o->sizes.len / sizeof(int64_t);
            if (!e.chunks || !HAS(&e, K_SIZE)) { fail(r, "file entry lacks size or chunks"); goto fail; }
            if (read_chunks(r, e.chunks, &o->ids, &o->sizes, &total, &used)) goto fail;
            if (total != e.size) { fail(r, "chunk sizes do not add up to the file size"); goto fail; }
            if (o->sizes.len / sizeof(int64_t) > UINT32_MAX) { fail(r, "too many chunks"); goto fail; }
            cstart[i] = (unsigned int)before;
            ccount[i] = (unsigned int)(o->sizes.len / sizeof(int64_t) - before);
            size[i] = total;
            alloc[i] = used;
        } else if (t == 'l') {
            if (!HAS(&e, K_TARGET)) { fail(r, "symlink entry lacks its target"); goto fail; }
            size[i] = (long long)e.target.u;
            if (put_indexed(o->targets, i,
                            PyBytes_FromStringAndSize((const char *)e.target.data, (Py_ssize_t)e.target.u)))
                goto fail;
        } else if (t == 'd') {
            if (!HAS(&e, K_SUBTREE)) { fail(r, "directory entry lacks its subtree"); goto fail; }
            if (put_indexed(o->subtrees, i, PyBytes_FromStringAndSize((const char *)e.subtree.data, ID_SIZE)))
                goto fail;
        } else if (t == 'c' || t == 'b') {
            rdev[i] = e.rdev;
        }
        if (e.xattrs) {
            PyObject *xa = read_xattrs(r, e.xattrs);
            if (!xa) goto fail;
            if (xa == Py_None) Py_DECREF(xa);
            else if (put_indexed(o->xattrs, i, xa)) goto fail;
        }
    }
    return 0;
fail:
    columns_clear(o);
    return -1;
}

static PyObject *decode(PyObject *Py_UNUSED(self), PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    Reader r = {(const unsigned char *)view.buf, (const unsigned char *)view.buf + view.len, NULL};
    Item top, k, v;
    Columns o = {0};
    int has_version = 0, has_entries = 0, seen_version = 0;
    uint64_t version = 0;
    const char *entries_err = NULL; /* reported only if the version is one this reader knows */
    PyObject *result = NULL;

    if (container(&r, &top, T_MAP, 2, "a tree is not a map")) goto done;
    for (uint64_t j = 0; j < top.u; j++) {
        if (next(&r, &k)) goto done;
        if (k.type != T_STR) { fail(&r, "a tree key is not str"); goto done; }
        switch (key_id(&k)) {
        case K_ENTRIES: {
            if (has_entries) { fail(&r, "entries given twice"); goto done; }
            has_entries = 1;
            /* parsed in the one pass (the writer puts version first, so a tree of another
             * version is refused before its entries are looked at) */
            if (has_version && version != TREE_VERSION) {
                if (skip(&r, 1)) goto done;
                break;
            }
            const unsigned char *at = r.p;
            if (read_entries(&r, &o)) {
                if (PyErr_Occurred()) goto done;
                entries_err = r.err;
                r.err = NULL;
                r.p = at;
                if (skip(&r, 1)) goto done;
            }
            break;
        }
        case K_VERSION:
            /* once only: a later version must not undo the skip of entries read under another */
            if (seen_version) { fail(&r, "version given twice"); goto done; }
            seen_version = 1;
            if (next(&r, &v)) goto done;
            if (v.type == T_ARRAY || v.type == T_MAP) { fail(&r, "bad version"); goto done; }
            has_version = v.type == T_UINT;
            if (has_version) version = v.u;
            break;
        default:
            if (skip(&r, 1)) goto done;
        }
    }
    if (r.p != r.end) { fail(&r, "extra data after the tree"); goto done; }
    if (!has_version || version != TREE_VERSION) {
        if (has_version)
            PyErr_Format(PyExc_ValueError, "unsupported tree version %llu", (unsigned long long)version);
        else
            PyErr_SetString(PyExc_ValueError, "unsupported tree version (none)");
        goto done;
    }
    if (entries_err) { fail(&r, entries_err); goto done; }
    if (!has_entries || !o.names) { fail(&r, "tree lacks entries"); goto done; }
    PyObject *chunk_ids = PyBytes_FromStringAndSize(o.ids.buf ? o.ids.buf : "", (Py_ssize_t)o.ids.len);
    PyObject *chunk_sizes = chunk_ids ? PyBytes_FromStringAndSize(o.sizes.buf ? o.sizes.buf : "", (Py_ssize_t)o.sizes.len)
                                      : NULL;
    if (!chunk_sizes) { Py_XDECREF(chunk_ids); goto done; }
    result = Py_BuildValue("(OOOOOOOOOOOOOOOOOOO)", o.names, o.col[0], o.col[1], o.col[2], o.col[3], o.col[4],
                           o.col[5], o.col[6], o.col[7], o.col[8], o.col[9], o.col[10], o.col[11], o.col[12],
                           chunk_ids, chunk_sizes, o.targets, o.subtrees, o.xattrs);
    Py_DECREF(chunk_ids);
    Py_DECREF(chunk_sizes);

done:
    if (!result && r.err && !PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, r.err);
    columns_clear(&o);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"decode", decode, METH_O,
     "decode(data) -> (names, mode, nlink, uid, gid, size, alloc, rdev, atime, mtime, ctime, hardlink,\n"
     "cstart, ccount, chunk_ids, chunk_sizes, targets, subtrees, xattrs)\n\n"
     "The columns of a tree blob's payload: the numeric ones as the bytes of arrays of types\n"
     "I I I I q q Q q q q I I I, chunk_sizes as q; raises ValueError on a malformed tree."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_treecols", NULL, -1, methods};

PyMODINIT_FUNC PyInit__treecols(void) { return PyModule_Create(&module); }
