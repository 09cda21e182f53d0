/*
 * What both command readers share (procmon.c, the connector's; ebpfmon.c, the eBPF
 * loader): the binary records they write, the table of watched containers and of their
 * member processes, the /proc reads that place a process, and the stdin commands.
 * Included once by each reader (after `#define _GNU_SOURCE`); every function is static.
 *
 * The including reader defines `watch(s, pids)` and `unwatch(s)`, its side of a
 * `watch <cid> [pid,...]` / `unwatch <cid>` line of stdin (see `command`).
 *
 * The records are `sandbox.proc_table.pack_record`'s: struct `=IBBBxiiiqq64s` (size,
 * kind, has_exit, flags, pid, ppid, exit, start_ns, ns, cid) followed by size-100 bytes
 * of argv (NUL-separated, no trailing NUL).
 */
#ifndef SANDFLEET_READER_COMMON_H
#define SANDFLEET_READER_COMMON_H

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define REC_START 1
#define REC_END 2
#define REC_EMPTY 3
#define REC_ACK 4
#define REC_LOST 5
#define REC_HEAD 100
#define REC_FLAG_TRUNCATED 1 /* argv was cut (the eBPF reader's limit) */
#define CID_LEN 64
#define MAX_SLOTS 4096
#define OUTBUF (1 << 16)

struct running {
    int32_t ppid;
    int64_t start_ns;
    uint32_t argv_len;
    int truncated;
    char argv[]; /* NUL-separated, no trailing NUL */
};

struct slot {
    char cid[CID_LEN];
    int active;
    long members;
    uint32_t inum;   /* ebpfmon: its pid namespace, once known (0: not yet) */
    int reaper_gone; /* ebpfmon: pid 1 of its namespace exited: nothing can join any more */
    uint64_t reaper_start; /* ebpfmon: that reaper's start time (0: not seen yet) */
};

static uint16_t *owner;          /* member process -> slot + 1 */
static struct running **running; /* member process -> its running command */
static long pid_max, max_pid_seen;
static struct slot slots[MAX_SLOTS];
static int nslots, nactive;

static char out[OUTBUF];
static size_t out_len;
static int64_t out_since = -1; /* when the oldest record not yet written was emitted */

static char *rd; /* reused buffer for /proc reads */
static size_t rd_cap;

static void watch(int s, char *pids); /* slot `s` is watched; `pids` "1,2,..." or NULL */
static void unwatch(int s);            /* slot `s` is no longer watched */

static int64_t clock_ns(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int64_t now_ns(void) { return clock_ns(CLOCK_MONOTONIC); }

/* -- output ---------------------------------------------------------------------------- */

static int write_all(const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(1, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static void flush_out(void) {
    if (out_len > 0 && write_all(out, out_len) < 0) exit(1); /* the parent is gone */
    out_len = 0;
    out_since = -1;
}

static void emit(int kind, const char *cid, int32_t pid, int32_t ppid, int has_exit,
                 int32_t code, int64_t start_ns, int64_t ns, const char *argv, uint32_t alen,
                 int flags) {
    uint32_t size = REC_HEAD + alen;
    char head[REC_HEAD];
    memset(head, 0, sizeof head);
    memcpy(head, &size, 4);
    head[4] = (char)kind;
    head[5] = (char)has_exit;
    head[6] = (char)flags;
    memcpy(head + 8, &pid, 4);
    memcpy(head + 12, &ppid, 4);
    memcpy(head + 16, &code, 4);
    memcpy(head + 20, &start_ns, 8);
    memcpy(head + 28, &ns, 8);
    if (cid != NULL) memcpy(head + 36, cid, CID_LEN);
    if (out_len + size > OUTBUF) flush_out();
    if (size > OUTBUF) { /* a huge argv: straight through */
        if (write_all(head, REC_HEAD) < 0 || write_all(argv, alen) < 0) exit(1);
    } else {
        memcpy(out + out_len, head, REC_HEAD);
        if (alen) memcpy(out + out_len + REC_HEAD, argv, alen);
        out_len += size;
    }
    if (out_since < 0) out_since = now_ns();
}

/* The `{"t":"error"}` line instead of the `ready` one, and exit. */
static void fail_start(const char *fmt, ...) {
    char msg[384], line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    for (char *c = msg; *c; c++)
        if (*c == '"' || *c == '\\' || (unsigned char)*c < 0x20) *c = ' ';
    int n = snprintf(line, sizeof line, "{\"t\":\"error\",\"msg\":\"%s\"}\n", msg);
    write_all(line, (size_t)n);
    exit(1);
}

/* -- /proc ----------------------------------------------------------------------------- */

/* The whole of /proc/<pid>/<name> into `rd`; its length, or -1 when the process is gone. */
static ssize_t read_proc(int32_t pid, const char *name) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/%s", pid, name);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    size_t len = 0;
    for (;;) {
        if (len + 4096 > rd_cap) {
            size_t cap = rd_cap ? rd_cap * 2 : 65536;
            char *p = realloc(rd, cap);
            if (p == NULL) break;
            rd = p;
            rd_cap = cap;
        }
        size_t want = rd_cap - len - 1;
        ssize_t n = read(fd, rd + len, want);
        if (n < 0) {
            if (errno == EINTR) continue;
            close(fd);
            return -1; /* ESRCH: exited between open and read */
        }
        if (n == 0) break;
        len += (size_t)n;
        if ((size_t)n < want) break; /* a short read of a /proc file is its end */
    }
    close(fd);
    rd[len] = '\0';
    return (ssize_t)len;
}

static int is_hex(char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); }

/* The container id in one cgroup path: 64 hex digits as a whole component, optionally
 * `docker-<id>.scope` (the regex of sandbox.proc_table.container_id_of). */
static const char *cid_in_path(const char *p, size_t len) {
    for (size_t i = 0; i < len; i++) {
        if (i > 0 && p[i - 1] != '/') continue;
        size_t j = i;
        if (len - j >= 7 && memcmp(p + j, "docker-", 7) == 0) j += 7;
        if (len - j < CID_LEN) continue;
        size_t k = 0;
        while (k < CID_LEN && is_hex(p[j + k])) k++;
        if (k < CID_LEN) continue;
        size_t e = j + CID_LEN;
        if (len - e >= 6 && memcmp(p + e, ".scope", 6) == 0) e += 6;
        if (e == len || p[e] == '/') return p + j;
    }
    return NULL;
}

/* The watched slot of container `cid`, or -1. */
static int find_slot(const char *cid) {
    for (int s = 0; s < nslots; s++)
        if (slots[s].active && memcmp(slots[s].cid, cid, CID_LEN) == 0) return s;
    return -1;
}

/* The slot named by /proc/<pid>/cgroup: slot + 1; 0 another container; -1 gone; -2 in no
 * container's cgroup (a host process, or a sandbox's first process before runc moves it
 * into its container's cgroup: not a verdict on its pid namespace). */
static int slot_by_cgroup(int32_t pid) {
    if (pid <= 0) return -1;
    ssize_t n = read_proc(pid, "cgroup");
    if (n < 0) return -1;
    char *line = rd, *end = rd + n;
    while (line < end) {
        char *nl = memchr(line, '\n', (size_t)(end - line));
        char *stop = nl ? nl : end;
        char *path = line;
        for (char *c = line; c < stop; c++)
            if (*c == ':') path = c + 1;
        const char *cid = cid_in_path(path, (size_t)(stop - path));
        if (cid != NULL) return find_slot(cid) + 1;
        line = stop + 1;
    }
    return -2;
}

/* -- the process table (sandbox.proc_table.ProcessTable, in C) ------------------------ */

/* `owner` and `running`, one entry a possible pid. */
static void alloc_tables(void) {
    FILE *pm = fopen("/proc/sys/kernel/pid_max", "r");
    if (pm == NULL || fscanf(pm, "%ld", &pid_max) != 1) pid_max = 4194304;
    if (pm != NULL) fclose(pm);
    pid_max += 1;
    owner = calloc((size_t)pid_max, sizeof *owner);
    running = calloc((size_t)pid_max, sizeof *running);
    if (owner == NULL || running == NULL) fail_start("calloc: %s", strerror(errno));
}

static int valid(int32_t pid) { return pid > 0 && pid < pid_max; }

static int32_t decode_exit(int32_t status) {
    int32_t sig = status & 0x7f;
    return sig ? -sig : (status >> 8) & 0xff;
}

/* A new command of `pid` (its argv copied), replacing none; its record emitted. */
static void start_command(int s1, int32_t pid, int32_t ppid, int64_t ns, const char *argv,
                          uint32_t alen, int truncated) {
    struct running *r = malloc(sizeof *r + alen);
    if (r == NULL) return;
    r->ppid = ppid;
    r->start_ns = ns;
    r->argv_len = alen;
    r->truncated = truncated;
    memcpy(r->argv, argv, alen);
    running[pid] = r;
    emit(REC_START, slots[s1 - 1].cid, pid, ppid, 0, 0, ns, ns, r->argv, alen,
         truncated ? REC_FLAG_TRUNCATED : 0);
}

static void end_command(int s1, int32_t pid, int64_t ns, int has_exit, int32_t code) {
    struct running *r = running[pid];
    if (r == NULL) return;
    running[pid] = NULL;
    emit(REC_END, slots[s1 - 1].cid, pid, r->ppid, has_exit, code, r->start_ns, ns, r->argv,
         r->argv_len, r->truncated ? REC_FLAG_TRUNCATED : 0);
    free(r);
}

/* A free slot for container `cid`, now watched and empty; -1 when all are taken. */
static int open_slot(const char *cid) {
    int s;
    for (s = 0; s < nslots && slots[s].active; s++) {
    }
    if (s == MAX_SLOTS) return -1;
    if (s == nslots) nslots++;
    memset(&slots[s], 0, sizeof slots[s]);
    memcpy(slots[s].cid, cid, CID_LEN);
    slots[s].active = 1;
    nactive++;
    return s;
}

/* Slot `s` no longer watched: its members and their running commands forgotten. */
static void close_slot(int s) {
    for (long pid = 1; pid <= max_pid_seen; pid++) {
        if (owner[pid] != s + 1) continue;
        owner[pid] = 0;
        free(running[pid]);
        running[pid] = NULL;
    }
    slots[s].active = 0;
    slots[s].members = 0;
    nactive--;
}

/* -- stdin ----------------------------------------------------------------------------- */

/* One line: `watch <cid> [pid,...]` or `unwatch <cid>`; acknowledged unless malformed. */
static void command(char *line) {
    char *verb = strtok(line, " ");
    char *cid = strtok(NULL, " ");
    char *pids = strtok(NULL, " ");
    if (verb == NULL || cid == NULL || strlen(cid) != CID_LEN) return;
    int s = find_slot(cid);
    if (strcmp(verb, "watch") == 0) {
        if (s < 0 && (s = open_slot(cid)) < 0) return;
        watch(s, pids);
    } else if (strcmp(verb, "unwatch") == 0 && s >= 0) {
        unwatch(s);
    }
    emit(REC_ACK, cid, 0, 0, 0, 0, 0, 0, NULL, 0, 0);
}

/* Every whole line now readable on stdin through `command`; 0 when stdin has closed. */
static int read_commands(void) {
    static char cmd[1 << 20];
    static size_t cmd_len;
    ssize_t n = read(0, cmd + cmd_len, sizeof cmd - cmd_len - 1);
    if (n <= 0) return 0;
    cmd_len += (size_t)n;
    char *start = cmd, *nl;
    while ((nl = memchr(start, '\n', cmd_len - (size_t)(start - cmd))) != NULL) {
        *nl = '\0';
        command(start);
        start = nl + 1;
    }
    cmd_len -= (size_t)(start - cmd);
    memmove(cmd, start, cmd_len);
    return 1;
}

#endif
