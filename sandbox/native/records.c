/*
 * The command readers' records (reader_common.h `emit`) as ledger `events` rows, for
 * `sandbox.proc_table.EventDecoder`: a run of REC_START / REC_END records becomes one
 * Arrow record batch (handed over through the Arrow C data interface, so Python makes
 * it in one call) with the events schema: time (Unix us), team, batch, task, attempt,
 * node (the record's container's, given per container by the caller), kind, and the
 * payload as canonical JSON -- byte for byte what `sandbox.capture_records.
 * capture_events` + `accounting.schemas.canonical_json` make in Python (argv decoded as
 * UTF-8 with CPython's "replace", strings escaped as `json.dumps(ensure_ascii=False)`
 * does, keys sorted). Rows come grouped by container (in order within each), so each
 * container's are one slice; records of other containers are skipped.
 *
 * Built as a shared library by `sandbox.native.records_library()`; no state, so any
 * number of threads may call it.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define REC_START 1
#define REC_END 2
#define REC_HEAD 100
#define CID_LEN 64
#define FIXED_BOUND 160 /* a payload's bytes besides its argv's (keys, numbers) */

static int32_t i32(const uint8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

static int64_t i64(const uint8_t *p) {
    int64_t v;
    memcpy(&v, p, 8);
    return v;
}

static uint8_t *put(uint8_t *o, const char *s) {
    size_t n = strlen(s);
    memcpy(o, s, n);
    return o + n;
}

static uint8_t *put_int(uint8_t *o, __int128 v) {
    char tmp[48];
    int n = 0, neg = v < 0;
    unsigned __int128 u = neg ? (unsigned __int128)(-v) : (unsigned __int128)v;
    do {
        tmp[n++] = (char)('0' + (int)(u % 10));
        u /= 10;
    } while (u);
    if (neg) *o++ = '-';
    while (n) *o++ = (uint8_t)tmp[--n];
    return o;
}

/* One argv element as a JSON string: UTF-8 with every maximal invalid subpart replaced
 * by U+FFFD (CPython's errors="replace"), escaped like json.dumps(ensure_ascii=False). */
static uint8_t *put_str(uint8_t *o, const uint8_t *s, size_t n) {
    static const char hex[] = "0123456789abcdef";
    *o++ = '"';
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
            switch (c) {
            case '"': o = put(o, "\\\""); continue;
            case '\\': o = put(o, "\\\\"); continue;
            case '\n': o = put(o, "\\n"); continue;
            case '\r': o = put(o, "\\r"); continue;
            case '\t': o = put(o, "\\t"); continue;
            case '\b': o = put(o, "\\b"); continue;
            case '\f': o = put(o, "\\f"); continue;
            default: break;
            }
            if (c < 0x20) {
                o = put(o, "\\u00");
                *o++ = (uint8_t)hex[c >> 4];
                *o++ = (uint8_t)hex[c & 15];
            } else {
                *o++ = c;
            }
            continue;
        }
        size_t need = 0;
        uint8_t lo = 0x80, hi = 0xBF; /* the second byte's range */
        if (c >= 0xC2 && c <= 0xDF) {
            need = 1;
        } else if (c >= 0xE0 && c <= 0xEF) {
            need = 2;
            if (c == 0xE0) lo = 0xA0;
            if (c == 0xED) hi = 0x9F; /* no surrogates */
        } else if (c >= 0xF0 && c <= 0xF4) {
            need = 3;
            if (c == 0xF0) lo = 0x90;
            if (c == 0xF4) hi = 0x8F; /* nothing past U+10FFFF */
        }
        size_t j = 1;
        if (need && i + 1 < n && s[i + 1] >= lo && s[i + 1] <= hi) {
            j = 2;
            while (j <= need && i + j < n && (s[i + j] & 0xC0) == 0x80) j++;
        }
        if (need && j == need + 1) {
            memcpy(o, s + i, j);
            o += j;
        } else {
            o = put(o, "\xEF\xBF\xBD");
        }
        i += j;
    }
    *o++ = '"';
    return o;
}

static uint8_t *put_payload(uint8_t *o, const uint8_t *r) {
    uint32_t size;
    memcpy(&size, r, 4);
    int kind = r[4], has_exit = r[5];
    const uint8_t *argv = r + REC_HEAD;
    size_t alen = size - REC_HEAD;
    o = put(o, "{\"argv\":[");
    if (alen) {
        size_t a = 0;
        for (size_t i = 0; i <= alen; i++) {
            if (i == alen || argv[i] == 0) {
                if (a) *o++ = ',';
                o = put_str(o, argv + a, i - a);
                a = i + 1;
            }
        }
    }
    o = put(o, "],");
    if (kind == REC_END) {
        __int128 d = (__int128)i64(r + 28) - i64(r + 20);
        o = put(o, "\"duration_ms\":");
        o = put_int(o, d > 0 ? d / 1000000 : 0);
        if (has_exit) {
            o = put(o, ",\"exit\":");
            o = put_int(o, i32(r + 16));
        }
        *o++ = ',';
    }
    o = put(o, "\"mode\":\"netlink\",\"pid\":");
    o = put_int(o, i32(r + 8));
    o = put(o, ",\"ppid\":");
    o = put_int(o, i32(r + 12));
    *o++ = '}';
    return o;
}

/* -- the Arrow C data interface (arrow/c/abi.h) ------------------------------------- */

struct ArrowArray {
    int64_t length, null_count, offset, n_buffers, n_children;
    const void **buffers;
    struct ArrowArray **children;
    struct ArrowArray *dictionary;
    void (*release)(struct ArrowArray *);
    void *private_data;
};

/* What the caller knows of one watched container: its rows' common columns. */
struct sf_target {
    char cid[CID_LEN];
    const char *text[4]; /* team, batch, task, node (UTF-8) */
    int32_t text_len[4];
    int32_t attempt;
    int64_t offset_ns; /* CLOCK_MONOTONIC -> Unix time */
};

#define NCOLS 8      /* time, team, batch, task, attempt, node, kind, payload */
#define PIDS_KEPT 4  /* started pids reported per container */

struct batch_mem { /* one allocation per batch, and the payload text's own */
    struct ArrowArray children[NCOLS];
    struct ArrowArray *child_ptrs[NCOLS];
    const void *bufs[1 + 3 * NCOLS];
    uint8_t *text;
};

static void release_child(struct ArrowArray *a) { a->release = NULL; }

static void release_batch(struct ArrowArray *a) {
    struct batch_mem *m = a->private_data;
    free(m->text);
    free(m);
    a->release = NULL;
}

static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

static const char STARTED[] = "command_started", FINISHED[] = "command_finished";

/*
 * Decode the run of REC_START / REC_END records of `buf[off:len]`, up to the first record
 * of another kind or an incomplete one, into `out` (a struct array: the events rows of
 * the records of `targets`' containers, grouped by target; released by its consumer).
 * Per target: `counts` (rows), `started` (command_started rows), `pids` (the first
 * PIDS_KEPT started pids, -1 past them). Returns the rows (-1: out of memory, nothing
 * made); `*end_off` is where the run ended.
 */
int64_t sandfleet_decode_events(const uint8_t *buf, int64_t len, int64_t off, int64_t *end_off,
                                const struct sf_target *targets, int32_t ntargets,
                                int32_t *counts, int32_t *started, int32_t *pids,
                                struct ArrowArray *out) {
    int64_t cap = (len - off) / REC_HEAD + 1, n = 0, text_bound = 0, ident = 0;
    int64_t *at = malloc((size_t)cap * (sizeof(int64_t) + sizeof(int32_t)));
    if (at == NULL) return -1;
    int32_t *slot = (int32_t *)(at + cap);
    for (int32_t t = 0; t < ntargets; t++) {
        counts[t] = started[t] = 0;
        for (int j = 0; j < PIDS_KEPT; j++) pids[t * PIDS_KEPT + j] = -1;
    }
    while (off + REC_HEAD <= len) {
        const uint8_t *r = buf + off;
        uint32_t size;
        memcpy(&size, r, 4);
        if (size < REC_HEAD || (int64_t)size > len - off) break;
        if (r[4] != REC_START && r[4] != REC_END) break;
        int32_t t = 0;
        while (t < ntargets && memcmp(targets[t].cid, r + 36, CID_LEN) != 0) t++;
        if (t < ntargets) {
            const struct sf_target *g = &targets[t];
            if (r[4] == REC_START) {
                if (started[t] < PIDS_KEPT) pids[t * PIDS_KEPT + started[t]] = i32(r + 8);
                started[t]++;
            }
            counts[t]++;
            text_bound += 6 * (int64_t)(size - REC_HEAD) + FIXED_BOUND;
            ident += g->text_len[0] + g->text_len[1] + g->text_len[2] + g->text_len[3];
            at[n] = off;
            slot[n++] = t;
        }
        off += size;
    }
    *end_off = off;
    /* the buffers: time, 4 identity texts (offsets + data), attempt, kind, payload offsets */
    size_t o_time = align64(sizeof(struct batch_mem)), w = (size_t)n;
    size_t o_off[4], o_txt[4], pos = o_time + align64(8 * w);
    for (int c = 0; c < 4; c++) {
        o_off[c] = pos;
        pos += align64(4 * (w + 1));
    }
    size_t o_att = pos, o_koff = o_att + align64(4 * w), o_kind = o_koff + align64(4 * (w + 1));
    size_t o_poff = o_kind + align64(sizeof FINISHED * w);
    pos = o_poff + align64(4 * (w + 1));
    size_t ident_at = pos; /* then the identity texts, each column aligned */
    if (n == 0) {
        free(at);
        out->release = NULL;
        return 0;
    }
    struct batch_mem *m = aligned_alloc(64, align64(pos + (size_t)ident + 64 * 4));
    uint8_t *text = malloc((size_t)text_bound + 1);
    if (m == NULL || text == NULL || text_bound > INT32_MAX) {
        free(m);
        free(text);
        free(at);
        return -1;
    }
    uint8_t *base = (uint8_t *)m;
    int64_t ident_col[4] = {0, 0, 0, 0};
    for (int64_t i = 0; i < n; i++)
        for (int c = 0; c < 4; c++) ident_col[c] += targets[slot[i]].text_len[c];
    for (int c = 0; c < 4; c++) {
        o_txt[c] = ident_at;
        ident_at = align64(ident_at + (size_t)ident_col[c]);
    }
    /* counting sort by target: slot[i] becomes record i's row */
    int32_t next[ntargets > 0 ? ntargets : 1], row = 0;
    for (int32_t t = 0; t < ntargets; t++) {
        next[t] = row;
        row += counts[t];
    }
    int64_t *order = (int64_t *)(base + o_time); /* row -> record position, then times */
    for (int64_t i = 0; i < n; i++) order[next[slot[i]]++] = at[i];
    for (int64_t i = 0; i < n; i++) at[i] = order[i];
    for (int32_t t = 0, r0 = 0; t < ntargets; r0 += counts[t], t++)
        for (int32_t k = 0; k < counts[t]; k++) slot[r0 + k] = t;
    int64_t *time = order;
    int32_t *att = (int32_t *)(base + o_att), *koff = (int32_t *)(base + o_koff);
    int32_t *poff = (int32_t *)(base + o_poff), *ioff[4];
    uint8_t *kind = base + o_kind, *itxt[4];
    for (int c = 0; c < 4; c++) {
        ioff[c] = (int32_t *)(base + o_off[c]);
        itxt[c] = base + o_txt[c];
        ioff[c][0] = 0;
    }
    koff[0] = poff[0] = 0;
    uint8_t *p = text;
    int32_t klen = 0;
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *r = buf + at[i];
        const struct sf_target *g = &targets[slot[i]];
        __int128 us = ((__int128)i64(r + 28) + g->offset_ns);
        time[i] = (int64_t)(us >= 0 ? us / 1000 : -((-us + 999) / 1000));
        att[i] = g->attempt;
        for (int c = 0; c < 4; c++) {
            memcpy(itxt[c] + ioff[c][i], g->text[c], (size_t)g->text_len[c]);
            ioff[c][i + 1] = ioff[c][i] + g->text_len[c];
        }
        const char *k = r[4] == REC_START ? STARTED : FINISHED;
        size_t kl = r[4] == REC_START ? sizeof STARTED - 1 : sizeof FINISHED - 1;
        memcpy(kind + klen, k, kl);
        klen += (int32_t)kl;
        koff[i + 1] = klen;
        p = put_payload(p, r);
        poff[i + 1] = (int32_t)(p - text);
    }
    free(at);
    uint8_t *shrunk = realloc(text, (size_t)(p - text) + 1);
    m->text = shrunk != NULL ? shrunk : text;
    /* the struct array and its children, in the schema's column order */
    const void **b = m->bufs;
    b[0] = NULL; /* the struct's validity: no nulls */
    const void *cols[NCOLS][3] = {
        {NULL, time, NULL},
        {NULL, ioff[0], itxt[0]},
        {NULL, ioff[1], itxt[1]},
        {NULL, ioff[2], itxt[2]},
        {NULL, att, NULL},
        {NULL, ioff[3], itxt[3]},
        {NULL, koff, kind},
        {NULL, poff, m->text},
    };
    const int nbufs[NCOLS] = {2, 3, 3, 3, 2, 3, 3, 3};
    const void **cb = b + 1;
    for (int c = 0; c < NCOLS; c++) {
        struct ArrowArray *ch = &m->children[c];
        memset(ch, 0, sizeof *ch);
        ch->length = n;
        ch->n_buffers = nbufs[c];
        for (int j = 0; j < nbufs[c]; j++) cb[j] = cols[c][j];
        ch->buffers = cb;
        cb += nbufs[c];
        ch->release = release_child;
        m->child_ptrs[c] = ch;
    }
    memset(out, 0, sizeof *out);
    out->length = n;
    out->n_buffers = 1;
    out->buffers = b;
    out->n_children = NCOLS;
    out->children = m->child_ptrs;
    out->release = release_batch;
    out->private_data = m;
    return n;
}
