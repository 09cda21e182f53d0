/*
 * ebpfmon: the eBPF reader of every command in the watched containers.
 *
 * Loads `ebpfmon.bpf.o` (its path is argv[1]; built with this file by `sandbox/native.py`)
 * and speaks procmon's protocol exactly (see reader_common.h), so `sandbox.proc_hub` runs
 * either: `watch <cid> [pid,...]` / `unwatch <cid>` lines on stdin; on stdout one JSON
 * line (`{"t":"ready",...,"reader":"ebpf"}` or `{"t":"error","msg":...}`), then the
 * binary records of `sandbox.proc_table.pack_record`.
 *
 * The kernel reads argv at exec time and filters by pid namespace, so this process
 * never races a short command for /proc/<pid>/cmdline: it wakes on a timer (DRAIN_MS)
 * and drains the ring buffer in one go. A watch names its container's pids; their
 * /proc/<pid>/ns/pid inode goes into the `watched` map, with its reaper's start time from
 * its first record: an inode is reused by the next namespace, so both name one. A watch
 * without pids (the container is not started yet) asks the kernel for records of unknown
 * namespaces (`ctl[EMON_CTL_CATCH_NEW]`), which wake this reader at once; each is placed
 * by /proc/<pid>/cgroup (as procmon places a `docker exec`), a namespace of another
 * container is then ignored in the kernel, and one whose processes are in no container's
 * cgroup yet (runc's first) waits, pending, for its next record.
 *
 * Pids are host pids; times CLOCK_MONOTONIC ns. Ends when stdin closes.
 * With SANDFLEET_BPF_STATS=1 it keeps the kernel's BPF run-time statistics on, so the
 * programs' in-kernel CPU shows in /proc/<pid>/fdinfo (bench/monitor.py reads it).
 */
#define _GNU_SOURCE
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include "ebpfmon.h"
#include "reader_common.h"

#define DRAIN_MS 100 /* how often the ring buffer is drained: the exec -> record latency;
                        each drain wakes the hub (~100 us of Python): 50 ms cost twice the
                        CPU. A namespace still to be placed wakes it at once (the BPF side). */
#define MAX_PENDING 4096

static int watched_fd, ignored_fd, ctl_fd;
static uint32_t host_ns; /* this process's pid namespace: never a container's */
static uint64_t lost_seen;

/* -- /proc --------------------------------------------------------------------------- */

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

/* Delete the kernel's entry for slot `s`'s inode, unless another slot owns it now. */
static void unmap_ns(int s) {
    struct emon_watch v;
    if (slots[s].inum != 0 && bpf_map_lookup_elem(watched_fd, &slots[s].inum, &v) == 0 &&
        v.slot == (uint32_t)s + 1)
        bpf_map_delete_elem(watched_fd, &slots[s].inum);
}

/* Tell the kernel which namespace slot `s` watches (its inode, and its reaper's start
 * time once known). */
static void map_ns(int s) {
    struct emon_watch v = {.slot = (uint32_t)s + 1, .reaper_start = slots[s].reaper_start};
    bpf_map_update_elem(watched_fd, &slots[s].inum, &v, BPF_ANY);
}

static void learn_ns(int s, uint32_t inum, uint64_t reaper_start) {
    if (inum == 0) return;
    for (int o = 0; o < nslots; o++) /* a slot still holding this inode: its ns is dead */
        if (o != s && slots[o].active && slots[o].inum == inum) slots[o].inum = 0;
    if (slots[s].inum != inum) {
        unmap_ns(s);
        slots[s].inum = inum;
    }
    slots[s].reaper_start = reaper_start;
    map_ns(s);
}

static void forget_ns(int s) {
    unmap_ns(s);
    slots[s].inum = 0;
    slots[s].reaper_start = 0;
}

/* -- the process table ----------------------------------------------------------------- */

static void join(int32_t pid, int s1) {
    if (owner[pid] == s1) return;
    if (owner[pid]) slots[owner[pid] - 1].members--;
    owner[pid] = (uint16_t)s1;
    slots[s1 - 1].members++;
    if (pid > max_pid_seen) max_pid_seen = pid;
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
        start_command(s1, pid, h->ppid, (int64_t)h->ts, argv, alen,
                      (h->flags & EMON_TRUNCATED) != 0);
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

/* Pending records are of one namespace when both its inode and its reaper's start time
 * match: a dead namespace's inode soon names another sandbox's. */
static int same_ns(const struct pending *p, uint32_t inum, uint64_t reaper_start) {
    return p->inum == inum && p->e.h.reaper_start == reaper_start;
}

static void replay_pending(uint32_t inum, uint64_t reaper_start, int s1) {
    int kept = 0;
    for (int i = 0; i < npending; i++) {
        if (same_ns(pending[i], inum, reaper_start)) {
            on_record(s1, &pending[i]->e.h, pending[i]->e.argv);
            free(pending[i]);
        } else {
            pending[kept++] = pending[i];
        }
    }
    npending = kept;
}

static void drop_pending(uint32_t inum, uint64_t reaper_start) {
    int kept = 0;
    for (int i = 0; i < npending; i++) {
        if (same_ns(pending[i], inum, reaper_start)) free(pending[i]);
        else pending[kept++] = pending[i];
    }
    npending = kept;
}

static void on_unknown(const struct emon_head *h, const char *argv) {
    for (int s = 0; s < nslots; s++) /* placed already, and the kernel not told yet */
        if (slots[s].active && slots[s].inum == h->ns_inum &&
            slots[s].reaper_start == h->reaper_start) {
            on_record(s + 1, h, argv);
            return;
        }
    int found = slot_by_cgroup(h->pid);
    if (found < 0) found = slot_by_cgroup(h->ppid);
    if (found < 0) { /* gone, or not in a container's cgroup yet: its namespace's next
                        record (which wakes this reader at once) tries again */
        keep_pending(h, argv);
        return;
    }
    if (found == 0) { /* another container, or none: not to be sent again */
        struct emon_ns_key key = {.inum = h->ns_inum, .reaper_start = h->reaper_start};
        uint8_t one = 1;
        bpf_map_update_elem(ignored_fd, &key, &one, BPF_ANY);
        drop_pending(h->ns_inum, h->reaper_start);
        return;
    }
    learn_ns(found - 1, h->ns_inum, h->reaper_start);
    replay_pending(h->ns_inum, h->reaper_start, found);
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
    if (h->flags & EMON_UNKNOWN_NS) {
        on_unknown(h, argv);
        return 0;
    }
    int s = (int)h->slot - 1;
    if (s < 0 || s >= nslots || !slots[s].active) return 0;
    struct slot *sl = &slots[s];
    if (sl->inum == h->ns_inum && sl->reaper_start == 0) {
        sl->reaper_start = h->reaper_start; /* its first record: now the kernel knows too */
        map_ns(s);
    }
    if (sl->inum != h->ns_inum || sl->reaper_start != h->reaper_start) {
        /* The kernel's map still named this slot, but the slot's namespace is dead and
         * its inode names a new one (of another sandbox, maybe): place that one anew. */
        on_unknown(h, argv);
        return 0;
    }
    on_record(s + 1, h, argv);
    return 0;
}

/* -- commands ------------------------------------------------------------------------ */

static void watch(int s, char *pids) {
    for (char *p = pids ? strtok(pids, ",") : NULL; p; p = strtok(NULL, ",")) {
        long pid = strtol(p, NULL, 10);
        if (!valid((int32_t)pid)) continue;
        join((int32_t)pid, s + 1);
        uint32_t inum = ns_of((int32_t)pid);
        if (slots[s].inum == 0 && inum != host_ns) learn_ns(s, inum, 0); /* start: 1st record */
    }
    set_catch_new();
}

static void unwatch(int s) {
    if (slots[s].inum != 0) drop_pending(slots[s].inum, slots[s].reaper_start);
    forget_ns(s);
    close_slot(s);
    set_catch_new();
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
    alloc_tables();

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
        int stdin_open = !got_in || read_commands();
        flush_out();
        if (!stdin_open) return 0; /* the parent is gone */
    }
}
