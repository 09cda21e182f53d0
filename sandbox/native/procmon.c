/*
 * procmon: the native reader of the kernel's process-events connector.
 *
 * The C twin of `python -m sandbox.proc_events` (same commands, same output), built by
 * `sandbox/native.py` (`make setup`). It reads every fork / exec / exit on the host,
 * follows which process belongs to which watched container (forks from a member, or
 * `/proc/<pid>/cgroup` naming the container at exec time, for a `docker exec`), reads
 * argv from `/proc/<pid>/cmdline` only for members, and writes binary records.
 *
 * stdin:  `watch <cid> [pid,...]` and `unwatch <cid>`, one per line.
 * stdout: one JSON line first (`{"t":"ready",...}` or `{"t":"error","msg":...}`), then
 *         records: struct `=IBBBxiiiqq64s` (size, kind, has_exit, argv_truncated, pid, ppid, exit,
 *         start_ns, ns, cid) followed by size-100 bytes of argv (NUL-separated).
 *         See `sandbox.proc_table.pack_record` / `unpack_records`.
 * Ends when stdin closes. Pids are host pids; times CLOCK_MONOTONIC ns (the kernel's).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/cn_proc.h>
#include <linux/connector.h>
#include <linux/netlink.h>
#include <poll.h>
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#define REC_START 1
#define REC_END 2
#define REC_EMPTY 3
#define REC_ACK 4
#define REC_LOST 5
#define REC_HEAD 100
#define CID_LEN 64
#define MAX_SLOTS 4096
#define MAX_CHAIN 16
#define FLUSH_NS 100000000LL /* records go out in batches: fewer wake-ups downstream */
#define LAZY_NS 250000000LL  /* how often forks and exits are read when no exec comes */
#define RCVBUF (8 << 20)
#define OUTBUF (1 << 16)

struct ev {
    uint32_t what;
    uint64_t ts;
    int32_t pid, tgid, ptgid, status;
};

struct running {
    int32_t ppid;
    int64_t start_ns;
    uint32_t argv_len;
    char argv[]; /* NUL-separated, no trailing NUL */
};

struct slot {
    char cid[CID_LEN];
    int active;
    long members;
};

static int32_t *parent;            /* every forked host process -> parent tgid */
static uint16_t *owner;            /* member process -> slot + 1 */
static struct running **running;   /* member process -> its running command */
static long pid_max;
static long max_pid_seen;
static struct slot slots[MAX_SLOTS];
static int nslots, nactive;

static char out[OUTBUF];
static size_t out_len;
static int64_t flush_at = -1;

static char *rd; /* reused buffer for /proc reads */
static size_t rd_cap;

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
    flush_at = -1;
}

static void emit(int kind, const char *cid, int32_t pid, int32_t ppid, int has_exit,
                 int32_t code, int64_t start_ns, int64_t ns, const char *argv, uint32_t alen) {
    uint32_t size = REC_HEAD + alen;
    char head[REC_HEAD];
    memset(head, 0, sizeof head);
    memcpy(head, &size, 4);
    head[4] = (char)kind;
    head[5] = (char)has_exit;
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
    if (flush_at < 0) flush_at = now_ns() + FLUSH_NS;
}

/* -- /proc ------------------------------------------------------------------------- */

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

/* argv into `rd` (NUL-separated, no trailing NUL), or a zombie's comm; its length. */
static uint32_t read_argv(int32_t pid) {
    ssize_t n = read_proc(pid, "cmdline");
    if (n > 0) {
        while (n > 0 && rd[n - 1] == '\0') n--;
        return (uint32_t)n;
    }
    n = read_proc(pid, "comm"); /* a zombie keeps its comm, not its cmdline */
    if (n <= 0) return 0;
    while (n > 0 && rd[n - 1] == '\n') n--;
    return (uint32_t)n;
}

static int32_t read_ppid(int32_t pid) {
    ssize_t n = read_proc(pid, "stat");
    if (n <= 0) return 0;
    char *close_paren = strrchr(rd, ')');
    if (close_paren == NULL) return 0;
    char state;
    int ppid;
    if (sscanf(close_paren + 1, " %c %d", &state, &ppid) != 2) return 0;
    return ppid;
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

/* The watched slot named by /proc/<pid>/cgroup: slot + 1, 0 (not watched), -1 (gone). */
static int slot_by_cgroup(int32_t pid) {
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

/* -- the process table (sandbox.proc_table.ProcessTable, in C) ---------------------- */

static int valid(int32_t pid) { return pid > 0 && pid < pid_max; }

static void join(int32_t pid, int s1) {
    if (owner[pid] == s1) return;
    owner[pid] = (uint16_t)s1;
    slots[s1 - 1].members++;
    if (pid > max_pid_seen) max_pid_seen = pid;
}

static int by_chain(int32_t pid) {
    for (int i = 0; i < MAX_CHAIN; i++) {
        pid = valid(pid) ? parent[pid] : 0;
        if (pid <= 1) return 0;
        if (owner[pid]) return owner[pid];
    }
    return 0;
}

static void end_command(int s1, int32_t pid, int64_t ns, int has_exit, int32_t code) {
    struct running *r = running[pid];
    if (r == NULL) return;
    running[pid] = NULL;
    emit(REC_END, slots[s1 - 1].cid, pid, r->ppid, has_exit, code, r->start_ns, ns, r->argv,
         r->argv_len);
    free(r);
}

static void on_fork(const struct ev *e) {
    if (e->pid != e->tgid || !valid(e->tgid)) return; /* a thread, not a process */
    parent[e->tgid] = e->ptgid;
    if (valid(e->ptgid) && owner[e->ptgid]) join(e->tgid, owner[e->ptgid]);
}

static void on_exec(const struct ev *e) {
    int32_t pid = e->tgid;
    if (!valid(pid)) return;
    int s1 = owner[pid];
    if (!s1) {
        if (nactive == 0) return;
        int found = slot_by_cgroup(pid);
        s1 = found >= 0 ? found : by_chain(pid);
        if (!s1 || !slots[s1 - 1].active) return;
    }
    uint32_t alen = read_argv(pid);
    if (!owner[pid]) join(pid, s1);
    int32_t ppid = parent[pid];
    if (ppid == 0) {
        char *keep = malloc(alen ? alen : 1);
        if (keep == NULL) return;
        memcpy(keep, rd, alen);
        ppid = read_ppid(pid);
        memcpy(rd, keep, alen);
        free(keep);
    }
    end_command(s1, pid, (int64_t)e->ts, 0, 0); /* an exec over an exec */
    struct running *r = malloc(sizeof *r + alen);
    if (r == NULL) return;
    r->ppid = ppid;
    r->start_ns = (int64_t)e->ts;
    r->argv_len = alen;
    memcpy(r->argv, rd, alen);
    running[pid] = r;
    emit(REC_START, slots[s1 - 1].cid, pid, ppid, 0, 0, r->start_ns, r->start_ns, r->argv, alen);
}

static int32_t decode_exit(int32_t status) {
    int32_t sig = status & 0x7f;
    return sig ? -sig : (status >> 8) & 0xff;
}

static void on_exit_ev(const struct ev *e) {
    int32_t pid = e->tgid;
    if (e->pid != e->tgid || !valid(pid)) return; /* a thread ended */
    parent[pid] = 0;
    int s1 = owner[pid];
    if (!s1) return;
    owner[pid] = 0;
    end_command(s1, pid, (int64_t)e->ts, 1, decode_exit(e->status));
    if (--slots[s1 - 1].members == 0 && slots[s1 - 1].active)
        emit(REC_EMPTY, slots[s1 - 1].cid, 0, 0, 0, 0, 0, (int64_t)e->ts, NULL, 0);
}

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
            memcpy(slots[s].cid, cid, CID_LEN);
            slots[s].active = 1;
            slots[s].members = 0;
            nactive++;
        }
        for (char *p = pids ? strtok(pids, ",") : NULL; p; p = strtok(NULL, ",")) {
            long pid = strtol(p, NULL, 10);
            if (valid((int32_t)pid) && owner[pid] != s + 1) {
                if (owner[pid]) slots[owner[pid] - 1].members--;
                join((int32_t)pid, s + 1);
            }
        }
    } else if (strcmp(verb, "unwatch") == 0 && s >= 0) {
        unwatch(s);
    }
    emit(REC_ACK, cid, 0, 0, 0, 0, 0, 0, NULL, 0);
}

/* -- the connector ------------------------------------------------------------------ */

static int open_connector(int with_mask, uint32_t mask) {
    int fd = socket(AF_NETLINK, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, NETLINK_CONNECTOR);
    if (fd < 0) return -1;
    int size = RCVBUF;
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) < 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    struct sockaddr_nl sa = {.nl_family = AF_NETLINK, .nl_groups = CN_IDX_PROC, .nl_pid = 0};
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) goto fail;
    char msg[NLMSG_HDRLEN + sizeof(struct cn_msg) + 8];
    memset(msg, 0, sizeof msg);
    uint32_t body[2] = {PROC_CN_MCAST_LISTEN, mask};
    uint16_t blen = with_mask ? 8 : 4;
    struct nlmsghdr *nh = (struct nlmsghdr *)msg;
    nh->nlmsg_len = (uint32_t)(NLMSG_HDRLEN + sizeof(struct cn_msg) + blen);
    nh->nlmsg_type = NLMSG_DONE;
    struct cn_msg *cn = (struct cn_msg *)(msg + NLMSG_HDRLEN);
    cn->id.idx = CN_IDX_PROC;
    cn->id.val = CN_VAL_PROC;
    cn->len = blen;
    memcpy(cn->data, body, blen);
    if (send(fd, msg, nh->nlmsg_len, 0) < 0) goto fail;
    return fd;
fail:
    close(fd);
    return -1;
}

static struct ev *evs;
static size_t nev, evcap;

static void push(const struct ev *e) {
    if (nev == evcap) {
        size_t cap = evcap ? evcap * 2 : 1024;
        struct ev *p = realloc(evs, cap * sizeof *p);
        if (p == NULL) return;
        evs = p;
        evcap = cap;
    }
    evs[nev++] = *e;
}

#define MSGS 64
#define MSG_SIZE 256 /* a connector message is under 100 bytes */
static char rbuf[MSGS][MSG_SIZE] __attribute__((aligned(8)));

static void parse(const char *buf, size_t n) {
    size_t off = 0;
    while (off + NLMSG_HDRLEN + sizeof(struct cn_msg) + 16 <= n) {
        const struct nlmsghdr *nh = (const struct nlmsghdr *)(buf + off);
        if (nh->nlmsg_len < NLMSG_HDRLEN + sizeof(struct cn_msg) || off + nh->nlmsg_len > n)
            break;
        const struct cn_msg *cn = (const struct cn_msg *)(buf + off + NLMSG_HDRLEN);
        const struct proc_event *pe = (const struct proc_event *)cn->data;
        size_t have = nh->nlmsg_len - NLMSG_HDRLEN - sizeof(struct cn_msg);
        struct ev e = {.what = pe->what, .ts = pe->timestamp_ns};
        size_t head = offsetof(struct proc_event, event_data);
        if (pe->what == PROC_EVENT_FORK && have >= head + sizeof pe->event_data.fork) {
            e.pid = pe->event_data.fork.child_pid;
            e.tgid = pe->event_data.fork.child_tgid;
            e.ptgid = pe->event_data.fork.parent_tgid;
            push(&e);
        } else if (pe->what == PROC_EVENT_EXEC && have >= head + sizeof pe->event_data.exec) {
            e.pid = pe->event_data.exec.process_pid;
            e.tgid = pe->event_data.exec.process_tgid;
            push(&e);
        } else if (pe->what == PROC_EVENT_EXIT && have >= head + 12) {
            e.pid = pe->event_data.exit.process_pid;
            e.tgid = pe->event_data.exit.process_tgid;
            e.status = (int32_t)pe->event_data.exit.exit_code;
            push(&e);
        }
        off += NLMSG_ALIGN(nh->nlmsg_len);
    }
}

/* Every datagram queued on `fd`, up to MSGS per system call. */
static void recv_all(int fd) {
    static struct mmsghdr msgs[MSGS];
    static struct iovec iov[MSGS];
    for (;;) {
        for (int i = 0; i < MSGS; i++) {
            iov[i].iov_base = rbuf[i];
            iov[i].iov_len = MSG_SIZE;
            memset(&msgs[i].msg_hdr, 0, sizeof msgs[i].msg_hdr);
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        int n = recvmmsg(fd, msgs, MSGS, MSG_DONTWAIT, NULL);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == ENOBUFS) {
                emit(REC_LOST, NULL, 0, 0, 0, 0, 0, 0, NULL, 0);
                continue;
            }
            return; /* EAGAIN */
        }
        for (int i = 0; i < n; i++) parse(rbuf[i], msgs[i].msg_len);
        if (n < MSGS) return;
    }
}

static int by_time(const void *a, const void *b) {
    uint64_t x = ((const struct ev *)a)->ts, y = ((const struct ev *)b)->ts;
    return (x > y) - (x < y);
}

static int fast_fd, slow_fd = -1;
static int64_t slow_at = -1;

/* Every event queued so far, in kernel order (forks and exits read first). */
static void drain(void) {
    nev = 0;
    if (slow_fd >= 0) {
        recv_all(slow_fd);
        slow_at = now_ns() + LAZY_NS;
    }
    recv_all(fast_fd);
    if (slow_fd >= 0 && nev > 1) {
        size_t i = 1; /* insertion sort when nearly sorted, qsort otherwise */
        while (i < nev && evs[i - 1].ts <= evs[i].ts) i++;
        if (i < nev) qsort(evs, nev, sizeof *evs, by_time);
    }
    for (size_t i = 0; i < nev; i++) {
        const struct ev *e = &evs[i];
        if (e->what == PROC_EVENT_FORK) on_fork(e);
        else if (e->what == PROC_EVENT_EXEC) on_exec(e);
        else on_exit_ev(e);
    }
}

static int kernel_filters_events(void) {
    struct utsname u;
    int major = 0, minor = 0;
    if (uname(&u) != 0 || sscanf(u.release, "%d.%d", &major, &minor) != 2) return 0;
    return major > 6 || (major == 6 && minor >= 6);
}

static void fail_start(const char *what) {
    char line[512];
    int n = snprintf(line, sizeof line, "{\"t\":\"error\",\"msg\":\"%s: %s\"}\n", what,
                     strerror(errno));
    write_all(line, (size_t)n);
    exit(1);
}

/* SCHED_FIFO 1 while the reader stays cheap (see _RealtimeGuard in proc_events.py). */
static int realtime;
static int64_t mark_wall, mark_cpu;

static int64_t cpu_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void guard_check(void) {
    if (!realtime) return;
    int64_t now = now_ns(), wall = now - mark_wall;
    if (wall < 1000000000LL) return;
    int64_t cpu = cpu_ns() - mark_cpu;
    mark_wall = now;
    mark_cpu = cpu_ns();
    if (cpu * 4 > wall) { /* over 25% of a core: back to normal priority for good */
        struct sched_param sp = {.sched_priority = 0};
        sched_setscheduler(0, SCHED_OTHER, &sp);
        realtime = 0;
        fprintf(stderr, "procmon: used %.0f%% of a core; normal priority now\n",
                100.0 * (double)cpu / (double)wall);
    }
}

int main(void) {
    FILE *pm = fopen("/proc/sys/kernel/pid_max", "r");
    if (pm == NULL || fscanf(pm, "%ld", &pid_max) != 1) pid_max = 4194304;
    if (pm != NULL) fclose(pm);
    pid_max += 1;
    parent = calloc((size_t)pid_max, sizeof *parent);
    owner = calloc((size_t)pid_max, sizeof *owner);
    running = calloc((size_t)pid_max, sizeof *running);
    if (parent == NULL || owner == NULL || running == NULL) fail_start("calloc");

    if (kernel_filters_events()) {
        fast_fd = open_connector(1, PROC_EVENT_EXEC);
        if (fast_fd < 0) fail_start("connector");
        slow_fd = open_connector(1, PROC_EVENT_FORK | PROC_EVENT_EXIT);
        if (slow_fd < 0) fail_start("connector");
    } else {
        fast_fd = open_connector(0, 0);
        if (fast_fd < 0) fail_start("connector");
    }
    struct sched_param sp = {.sched_priority = 1};
    realtime = sched_setscheduler(0, SCHED_FIFO, &sp) == 0;
    mark_wall = now_ns();
    mark_cpu = cpu_ns();
    char hello[96];
    int hn = snprintf(hello, sizeof hello, "{\"t\":\"ready\",\"realtime\":%s,\"reader\":\"native\"}\n",
                      realtime ? "true" : "false");
    if (write_all(hello, (size_t)hn) < 0) return 1;

    static char cmd[1 << 20];
    size_t cmd_len = 0;
    struct pollfd fds[2] = {{.fd = fast_fd, .events = POLLIN}, {.fd = 0, .events = POLLIN}};
    for (;;) {
        int64_t now = now_ns(), deadline = -1;
        if (slow_at >= 0) deadline = slow_at;
        if (flush_at >= 0 && (deadline < 0 || flush_at < deadline)) deadline = flush_at;
        int timeout = deadline < 0 ? -1 : (int)((deadline > now ? deadline - now : 0) / 1000000 + 1);
        int r = poll(fds, 2, timeout);
        if (r < 0 && errno != EINTR) return 1;
        int got_in = r > 0 && (fds[1].revents & (POLLIN | POLLHUP | POLLERR));
        if ((r > 0 && (fds[0].revents & POLLIN)) || got_in || (slow_at >= 0 && now_ns() >= slow_at))
            drain(); /* also before commands: an unwatch must not overtake exits */
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
            flush_out(); /* a subscriber waits for its ack */
        }
        if (flush_at >= 0 && now_ns() >= flush_at) flush_out();
        guard_check();
    }
}
