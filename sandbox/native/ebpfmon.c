/*
 * ebpfmon: the eBPF reader of every command in the watched containers.
 *
 * Loads `ebpfmon.bpf.o` (its path is argv[1]; built with this file by `sandbox/native.py`)
 * and speaks procmon's protocol exactly (see procmon.c), so `sandbox.proc_hub` runs
 * either: `watch <cid> [pid,...]` / `unwatch <cid>` lines on stdin; on stdout one JSON
 * line (`{"t":"ready",...,"reader":"ebpf"}` or `{"t":"error","msg":...}`), then the
 * binary records of `sandbox.proc_table.pack_record`.
 *
 * The kernel reads argv at exec time and filters by pid namespace, so this process
 * never races a short command for /proc/<pid>/cmdline: it wakes on a timer (DRAIN_MS)
 * and drains the ring buffer in one go. A watch names its container's pids; their
 * /proc/<pid>/ns/pid inode goes into the `watched` map. A watch without pids (the
 * container is not started yet) asks the kernel for records of unknown namespaces
 * (`ctl[EMON_CTL_CATCH_NEW]`); each is placed by /proc/<pid>/cgroup (as procmon places
 * a `docker exec`), and a namespace of another container or of no container is then
 * ignored in the kernel.
 *
 * Pids are host pids; times CLOCK_MONOTONIC ns. Ends when stdin closes.
 * With SANDFLEET_BPF_STATS=1 it keeps the kernel's BPF run-time statistics on, so the
 * programs' in-kernel CPU shows in /proc/<pid>/fdinfo (bench/monitor.py reads it).
 */
#define _GNU_SOURCE
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "ebpfmon.h"

#define REC_START 1
#define REC_END 2
#define REC_EMPTY 3
#define REC_ACK 4
#define REC_LOST 5
#define REC_HEAD 100
#define REC_FLAG_TRUNCATED 1
#define CID_LEN 64
#define MAX_SLOTS 4096
#define DRAIN_MS 50 /* how often the ring buffer is drained: the exec -> record latency */
#define OUTBUF (1 << 16)
#define MAX_PENDING 4096

struct running {
    int32_t ppid;
    int64_t start_ns;
    uint32_t argv_len;
    int truncated;
    char argv[];
};

struct slot {
    char cid[CID_LEN];
    int active;
    long members;
    uint32_t inum;   /* its pid namespace, once known (0: not yet) */
    int reaper_gone; /* pid 1 of its namespace exited: nothing can join any more */
};

static uint16_t *owner;          /* member process -> slot + 1 */
static struct running **running; /* member process -> its running command */
static long pid_max, max_pid_seen;
static struct slot slots[MAX_SLOTS];
static int nslots, nactive;

static int watched_fd, ignored_fd, ctl_fd;
static uint32_t host_ns; /* this process's pid namespace: never a container's */
static uint64_t lost_seen;

static char out[OUTBUF];
static size_t out_len;

static char rd[65536]; /* /proc reads */

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

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
    if (size > OUTBUF) {
        if (write_all(head, REC_HEAD) < 0 || write_all(argv, alen) < 0) exit(1);
    } else {
        memcpy(out + out_len, head, REC_HEAD);
        if (alen) memcpy(out + out_len + REC_HEAD, argv, alen);
        out_len += size;
    }
}

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

/* -- /proc --------------------------------------------------------------------------- */

static ssize_t read_proc(int32_t pid, const char *name) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/%s", pid, name);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    ssize_t n;
    do n = read(fd, rd, sizeof rd - 1);
    while (n < 0 && errno == EINTR);
    close(fd);
    if (n < 0) return -1;
    rd[n] = '\0';
    return n;
}

static int is_hex(char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); }

/* The container id in one cgroup path (sandbox.proc_table.container_id_of). */
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

/* The slot named by /proc/<pid>/cgroup: slot + 1; 0 another container or none; -1 gone. */
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
        if (cid != NULL) {
            for (int s = 0; s < nslots; s++)
                if (slots[s].active && memcmp(slots[s].cid, cid, CID_LEN) == 0) return s + 1;
            return 0;
        }
        line = stop + 1;
    }
    return 0;
}

static uint32_t ns_of(int32_t pid) {
    char path[64];
    struct stat st;
    snprintf(path, sizeof path, "/proc/%d/ns/pid", pid);
    return stat(path, &st) == 0 ? (uint32_t)st.st_ino : 0;
}

/* -- the kernel's maps ----------------------------------------------------------------- */

static void set_catch_new(void) {
    uint64_t on = 0;
    for (int s = 0; s < nslots; s++)
        if (slots[s].active && slots[s].inum == 0 && !slots[s].reaper_gone) on = 1;
    uint32_t k = EMON_CTL_CATCH_NEW;
    uint64_t was = 0;
    bpf_map_lookup_elem(ctl_fd, &k, &was);
    if (was == on) return;
    bpf_map_update_elem(ctl_fd, &k, &on, BPF_ANY);
    if (!on) { /* forget the ignored namespaces: an inode can be reused by a new one */
        struct emon_ns_key key, next;
        while (bpf_map_get_next_key(ignored_fd, NULL, &next) == 0) {
            key = next;
            bpf_map_delete_elem(ignored_fd, &key);
        }
    }
}

static void learn_ns(int s, uint32_t inum) {
    if (inum == 0 || slots[s].inum == inum) return;
    if (slots[s].inum != 0) bpf_map_delete_elem(watched_fd, &slots[s].inum);
    slots[s].inum = inum;
    uint32_t v = (uint32_t)s + 1;
    bpf_map_update_elem(watched_fd, &inum, &v, BPF_ANY);
}

static void forget_ns(int s) {
    if (slots[s].inum != 0) bpf_map_delete_elem(watched_fd, &slots[s].inum);
    slots[s].inum = 0;
}

/* -- the process table ----------------------------------------------------------------- */

static int valid(int32_t pid) { return pid > 0 && pid < pid_max; }

static void join(int32_t pid, int s1) {
    if (owner[pid] == s1) return;
    if (owner[pid]) slots[owner[pid] - 1].members--;
    owner[pid] = (uint16_t)s1;
    slots[s1 - 1].members++;
    if (pid > max_pid_seen) max_pid_seen = pid;
}

static void end_command(int s1, int32_t pid, int64_t ns, int has_exit, int32_t code) {
    struct running *r = running[pid];
    if (r == NULL) return;
    running[pid] = NULL;
    emit(REC_END, slots[s1 - 1].cid, pid, r->ppid, has_exit, code, r->start_ns, ns, r->argv,
         r->argv_len, r->truncated ? REC_FLAG_TRUNCATED : 0);
    free(r);
}

static int32_t decode_exit(int32_t status) {
    int32_t sig = status & 0x7f;
    return sig ? -sig : (status >> 8) & 0xff;
}

static void on_record(int s1, const struct emon_head *h, const char *argv) {
    int32_t pid = h->pid;
    if (!valid(pid) || s1 < 1 || s1 > nslots || !slots[s1 - 1].active) return;
    struct slot *sl = &slots[s1 - 1];
    if (h->kind == EMON_FORK) {
        join(pid, s1);
    } else if (h->kind == EMON_EXEC) {
        join(pid, s1);
        uint32_t alen = h->argv_len;
        if (alen > EMON_ARGV_MAX) alen = EMON_ARGV_MAX;
        while (alen > 0 && argv[alen - 1] == '\0') alen--;
        if (alen == 0) { /* unreadable argv: the program's name */
            argv = h->comm;
            alen = (uint32_t)strnlen(h->comm, EMON_COMM_LEN);
        }
        end_command(s1, pid, (int64_t)h->ts, 0, 0); /* an exec over an exec */
        struct running *r = malloc(sizeof *r + alen);
        if (r == NULL) return;
        r->ppid = h->ppid;
        r->start_ns = (int64_t)h->ts;
        r->argv_len = alen;
        r->truncated = (h->flags & EMON_TRUNCATED) != 0;
        memcpy(r->argv, argv, alen);
        running[pid] = r;
        emit(REC_START, sl->cid, pid, r->ppid, 0, 0, r->start_ns, r->start_ns, r->argv, alen,
             r->truncated ? REC_FLAG_TRUNCATED : 0);
    } else if (h->kind == EMON_EXIT) {
        if (h->flags & EMON_NS_INIT) sl->reaper_gone = 1;
        if (owner[pid] != s1) return;
        owner[pid] = 0;
        end_command(s1, pid, (int64_t)h->ts, 1, decode_exit(h->status));
        if (--sl->members == 0) {
            emit(REC_EMPTY, sl->cid, 0, 0, 0, 0, 0, (int64_t)h->ts, NULL, 0, 0);
            if (sl->reaper_gone) forget_ns(s1 - 1); /* the namespace is dead; its inode
                                                        may soon name another one */
        }
    }
}

/* Records of a namespace not yet placed (its processes were gone before their cgroup
 * could be read), replayed in order once another of its records places it. */
struct pending {
    uint32_t inum;
    struct emon_exec e;
};
static struct pending *pending[MAX_PENDING];
static int npending;

static void keep_pending(const struct emon_head *h, const char *argv) {
    if (npending == MAX_PENDING) {
        free(pending[0]);
        memmove(pending, pending + 1, (MAX_PENDING - 1) * sizeof *pending);
        npending--;
    }
    uint32_t alen = h->kind == EMON_EXEC && h->argv_len <= EMON_ARGV_MAX ? h->argv_len : 0;
    struct pending *p = malloc(sizeof *p);
    if (p == NULL) return;
    p->inum = h->ns_inum;
    p->e.h = *h;
    memcpy(p->e.argv, argv, alen);
    pending[npending++] = p;
}

static void replay_pending(uint32_t inum, int s1) {
    int kept = 0;
    for (int i = 0; i < npending; i++) {
        if (pending[i]->inum == inum) {
            on_record(s1, &pending[i]->e.h, pending[i]->e.argv);
            free(pending[i]);
        } else {
            pending[kept++] = pending[i];
        }
    }
    npending = kept;
}

static void drop_pending(uint32_t inum) {
    int kept = 0;
    for (int i = 0; i < npending; i++) {
        if (pending[i]->inum == inum) free(pending[i]);
        else pending[kept++] = pending[i];
    }
    npending = kept;
}

static void on_unknown(const struct emon_head *h, const char *argv) {
    for (int s = 0; s < nslots; s++) /* placed already, and the kernel not told yet */
        if (slots[s].active && slots[s].inum == h->ns_inum) {
            on_record(s + 1, h, argv);
            return;
        }
    int found = slot_by_cgroup(h->pid);
    if (found < 0) found = slot_by_cgroup(h->ppid);
    if (found < 0) {
        keep_pending(h, argv);
        return;
    }
    if (found == 0) { /* another container, or none: not to be sent again */
        struct emon_ns_key key = {.inum = h->ns_inum, .reaper_start = h->reaper_start};
        uint8_t one = 1;
        bpf_map_update_elem(ignored_fd, &key, &one, BPF_ANY);
        drop_pending(h->ns_inum);
        return;
    }
    learn_ns(found - 1, h->ns_inum);
    replay_pending(h->ns_inum, found);
    on_record(found, h, argv);
    set_catch_new();
}

static int on_event(void *ctx, void *data, size_t size) {
    (void)ctx;
    if (size < sizeof(struct emon_head)) return 0;
    const struct emon_head *h = data;
    const char *argv = h->kind == EMON_EXEC && size >= sizeof(struct emon_exec)
                           ? ((const struct emon_exec *)data)->argv
                           : "";
    if (h->flags & EMON_UNKNOWN_NS) on_unknown(h, argv);
    else on_record((int)h->slot, h, argv);
    return 0;
}

/* -- commands ------------------------------------------------------------------------ */

static int find_slot(const char *cid) {
    for (int s = 0; s < nslots; s++)
        if (slots[s].active && memcmp(slots[s].cid, cid, CID_LEN) == 0) return s;
    return -1;
}

static void unwatch(int s) {
    for (long pid = 1; pid <= max_pid_seen; pid++) {
        if (owner[pid] != s + 1) continue;
        owner[pid] = 0;
        free(running[pid]);
        running[pid] = NULL;
    }
    if (slots[s].inum != 0) drop_pending(slots[s].inum);
    forget_ns(s);
    slots[s].active = 0;
    slots[s].members = 0;
    nactive--;
}

static void command(char *line) {
    char *verb = strtok(line, " ");
    char *cid = strtok(NULL, " ");
    char *pids = strtok(NULL, " ");
    if (verb == NULL || cid == NULL || strlen(cid) != CID_LEN) return;
    int s = find_slot(cid);
    if (strcmp(verb, "watch") == 0) {
        if (s < 0) {
            for (s = 0; s < nslots && slots[s].active; s++) {
            }
            if (s == MAX_SLOTS) return;
            if (s == nslots) nslots++;
            memset(&slots[s], 0, sizeof slots[s]);
            memcpy(slots[s].cid, cid, CID_LEN);
            slots[s].active = 1;
            nactive++;
        }
        for (char *p = pids ? strtok(pids, ",") : NULL; p; p = strtok(NULL, ",")) {
            long pid = strtol(p, NULL, 10);
            if (!valid((int32_t)pid)) continue;
            join((int32_t)pid, s + 1);
            uint32_t inum = ns_of((int32_t)pid);
            if (slots[s].inum == 0 && inum != host_ns) learn_ns(s, inum);
        }
        set_catch_new();
    } else if (strcmp(verb, "unwatch") == 0 && s >= 0) {
        unwatch(s);
        set_catch_new();
    }
    emit(REC_ACK, cid, 0, 0, 0, 0, 0, 0, NULL, 0, 0);
}

/* -- main ---------------------------------------------------------------------------- */

static char libbpf_said[256];

static int on_libbpf(enum libbpf_print_level level, const char *fmt, va_list ap) {
    if (level == LIBBPF_DEBUG) return 0;
    va_list copy;
    va_copy(copy, ap);
    vsnprintf(libbpf_said, sizeof libbpf_said, fmt, copy); /* the last word, for errors */
    va_end(copy);
    size_t n = strlen(libbpf_said);
    while (n > 0 && libbpf_said[n - 1] == '\n') libbpf_said[--n] = '\0';
    return vfprintf(stderr, fmt, ap);
}

static void drain(struct ring_buffer *rb) {
    if (ring_buffer__consume(rb) < 0) exit(1);
    uint32_t k = EMON_CTL_LOST;
    uint64_t lost = 0;
    if (bpf_map_lookup_elem(ctl_fd, &k, &lost) == 0 && lost != lost_seen) {
        lost_seen = lost;
        emit(REC_LOST, NULL, 0, 0, 0, 0, 0, 0, NULL, 0, 0);
    }
}

int main(int argc, char **argv) {
    if (argc != 2) fail_start("usage: ebpfmon <ebpfmon.bpf.o>");
    FILE *pm = fopen("/proc/sys/kernel/pid_max", "r");
    if (pm == NULL || fscanf(pm, "%ld", &pid_max) != 1) pid_max = 4194304;
    if (pm != NULL) fclose(pm);
    pid_max += 1;
    owner = calloc((size_t)pid_max, sizeof *owner);
    running = calloc((size_t)pid_max, sizeof *running);
    if (owner == NULL || running == NULL) fail_start("calloc: %s", strerror(errno));

    host_ns = ns_of(getpid());
    libbpf_set_print(on_libbpf);
    struct rlimit unlimited = {RLIM_INFINITY, RLIM_INFINITY};
    setrlimit(RLIMIT_MEMLOCK, &unlimited); /* kernels before 5.11 charge maps to it */
    struct bpf_object *obj = bpf_object__open_file(argv[1], NULL);
    if (obj == NULL) fail_start("opening %s: %s", argv[1], strerror(errno));
    int err = bpf_object__load(obj);
    if (err)
        fail_start("the kernel refused the BPF program (%s; %s)", strerror(-err), libbpf_said);
    struct bpf_program *prog;
    bpf_object__for_each_program(prog, obj) {
        if (bpf_program__attach(prog) == NULL)
            fail_start("attaching %s: %s (%s)", bpf_program__name(prog), strerror(errno),
                       libbpf_said);
    }
    watched_fd = bpf_object__find_map_fd_by_name(obj, "watched");
    ignored_fd = bpf_object__find_map_fd_by_name(obj, "ignored");
    ctl_fd = bpf_object__find_map_fd_by_name(obj, "ctl");
    int events_fd = bpf_object__find_map_fd_by_name(obj, "events");
    if (watched_fd < 0 || ignored_fd < 0 || ctl_fd < 0 || events_fd < 0)
        fail_start("the BPF object lacks its maps");
    struct ring_buffer *rb = ring_buffer__new(events_fd, on_event, NULL, NULL);
    if (rb == NULL) fail_start("ring buffer: %s", strerror(errno));
    const char *stats = getenv("SANDFLEET_BPF_STATS");
    if (stats != NULL && strcmp(stats, "1") == 0 && bpf_enable_stats(BPF_STATS_RUN_TIME) < 0)
        fprintf(stderr, "ebpfmon: BPF run-time statistics unavailable: %s\n", strerror(errno));

    const char hello[] = "{\"t\":\"ready\",\"realtime\":false,\"reader\":\"ebpf\"}\n";
    if (write_all(hello, sizeof hello - 1) < 0) return 1;

    static char cmd[1 << 20];
    size_t cmd_len = 0;
    struct pollfd fds[2] = {{.fd = ring_buffer__epoll_fd(rb), .events = POLLIN},
                            {.fd = 0, .events = POLLIN}};
    int64_t drain_at = now_ns() + DRAIN_MS * 1000000LL;
    for (;;) {
        int64_t now = now_ns();
        int timeout = drain_at > now ? (int)((drain_at - now) / 1000000) + 1 : 0;
        int r = poll(fds, 2, timeout);
        if (r < 0 && errno != EINTR) return 1;
        int got_in = r > 0 && (fds[1].revents & (POLLIN | POLLHUP | POLLERR));
        if (got_in || (r > 0 && (fds[0].revents & POLLIN)) || now_ns() >= drain_at) {
            drain(rb); /* also before commands: an unwatch must not overtake exits */
            drain_at = now_ns() + DRAIN_MS * 1000000LL;
        }
        if (got_in) {
            ssize_t n = read(0, cmd + cmd_len, sizeof cmd - cmd_len - 1);
            if (n <= 0) {
                flush_out();
                return 0; /* the parent is gone */
            }
            cmd_len += (size_t)n;
            char *start = cmd, *nl;
            while ((nl = memchr(start, '\n', cmd_len - (size_t)(start - cmd))) != NULL) {
                *nl = '\0';
                command(start);
                start = nl + 1;
            }
            cmd_len -= (size_t)(start - cmd);
            memmove(cmd, start, cmd_len);
        }
        flush_out();
    }
}
