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
#include <linux/cn_proc.h>
#include <linux/connector.h>
#include <linux/netlink.h>
#include <poll.h>
#include <sched.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/utsname.h>

#include "reader_common.h"

#define MAX_CHAIN 16
#define FLUSH_NS 100000000LL /* records go out in batches: fewer wake-ups downstream */
#define LAZY_NS 250000000LL  /* how often forks and exits are read when no exec comes */
#define RCVBUF (8 << 20)

struct ev {
    uint32_t what;
    uint64_t ts;
    int32_t pid, tgid, ptgid, status;
};

static int32_t *parent; /* every forked host process -> parent tgid */

/* -- /proc ------------------------------------------------------------------------- */

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

/* -- the process table (sandbox.proc_table.ProcessTable, in C) ---------------------- */

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
    start_command(s1, pid, ppid, (int64_t)e->ts, rd, alen, 0);
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
        emit(REC_EMPTY, slots[s1 - 1].cid, 0, 0, 0, 0, 0, (int64_t)e->ts, NULL, 0, 0);
}

static void watch(int s, char *pids) {
    for (char *p = pids ? strtok(pids, ",") : NULL; p; p = strtok(NULL, ",")) {
        long pid = strtol(p, NULL, 10);
        if (valid((int32_t)pid) && owner[pid] != s + 1) {
            if (owner[pid]) slots[owner[pid] - 1].members--;
            join((int32_t)pid, s + 1);
        }
    }
}

static void unwatch(int s) { close_slot(s); }

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
                emit(REC_LOST, NULL, 0, 0, 0, 0, 0, 0, NULL, 0, 0);
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

/* SCHED_FIFO 1 while the reader stays cheap (see _RealtimeGuard in proc_events.py). */
static int realtime;
static int64_t mark_wall, mark_cpu;

static int64_t cpu_ns(void) { return clock_ns(CLOCK_PROCESS_CPUTIME_ID); }

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
    alloc_tables();
    parent = calloc((size_t)pid_max, sizeof *parent);
    if (parent == NULL) fail_start("calloc: %s", strerror(errno));

    if (kernel_filters_events()) {
        fast_fd = open_connector(1, PROC_EVENT_EXEC);
        if (fast_fd < 0) fail_start("connector: %s", strerror(errno));
        slow_fd = open_connector(1, PROC_EVENT_FORK | PROC_EVENT_EXIT);
        if (slow_fd < 0) fail_start("connector: %s", strerror(errno));
    } else {
        fast_fd = open_connector(0, 0);
        if (fast_fd < 0) fail_start("connector: %s", strerror(errno));
    }
    struct sched_param sp = {.sched_priority = 1};
    realtime = sched_setscheduler(0, SCHED_FIFO, &sp) == 0;
    mark_wall = now_ns();
    mark_cpu = cpu_ns();
    char hello[96];
    int hn = snprintf(hello, sizeof hello, "{\"t\":\"ready\",\"realtime\":%s,\"reader\":\"native\"}\n",
                      realtime ? "true" : "false");
    if (write_all(hello, (size_t)hn) < 0) return 1;

    struct pollfd fds[2] = {{.fd = fast_fd, .events = POLLIN}, {.fd = 0, .events = POLLIN}};
    for (;;) {
        int64_t now = now_ns(), deadline = -1;
        int64_t flush_at = out_since < 0 ? -1 : out_since + FLUSH_NS;
        if (slow_at >= 0) deadline = slow_at;
        if (flush_at >= 0 && (deadline < 0 || flush_at < deadline)) deadline = flush_at;
        int timeout = deadline < 0 ? -1 : (int)((deadline > now ? deadline - now : 0) / 1000000 + 1);
        int r = poll(fds, 2, timeout);
        if (r < 0 && errno != EINTR) return 1;
        int got_in = r > 0 && (fds[1].revents & (POLLIN | POLLHUP | POLLERR));
        if ((r > 0 && (fds[0].revents & POLLIN)) || got_in || (slow_at >= 0 && now_ns() >= slow_at))
            drain(); /* also before commands: an unwatch must not overtake exits */
        if (got_in) {
            int stdin_open = read_commands();
            flush_out(); /* a subscriber waits for its ack */
            if (!stdin_open) return 0; /* the parent is gone */
        }
        if (out_since >= 0 && now_ns() >= out_since + FLUSH_NS) flush_out();
        guard_check();
    }
}
