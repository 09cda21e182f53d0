/*
 * ebpfmon.bpf.c: every fork / exec / exit in the watched containers, with argv read in
 * the kernel at exec time, into a ring buffer that user space (ebpfmon.c) drains in
 * batches on a timer: no wake-up per exec. A container is known by its pid namespace
 * (`watched`: ns inode -> slot + 1 and the namespace's reaper's start time, filled by the
 * loader: a dead namespace's inode soon names another sandbox's); while a watch does not know
 * its namespace yet (`ctl[EMON_CTL_CATCH_NEW]`), records of any other non-host
 * namespace are sent flagged EMON_UNKNOWN_NS so the loader can place them by cgroup,
 * until it tells the kernel to ignore that namespace (`ignored`).
 *
 * CO-RE with local struct definitions (no vmlinux.h): the kernel's BTF relocates each
 * field read at load time. Raw BTF tracepoints: no tracefs needed.
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

#include "ebpfmon.h"

char LICENSE[] SEC("license") = "GPL";

struct ns_common {
    unsigned int inum;
} __attribute__((preserve_access_index));

struct task_struct;

struct pid_namespace {
    struct task_struct *child_reaper;
    struct pid_namespace *parent;
    unsigned int level;
    struct ns_common ns;
} __attribute__((preserve_access_index));

struct upid {
    int nr;
    struct pid_namespace *ns;
} __attribute__((preserve_access_index));

struct pid {
    unsigned int level;
    struct upid numbers[1];
} __attribute__((preserve_access_index));

struct mm_struct {
    unsigned long arg_start;
    unsigned long arg_end;
} __attribute__((preserve_access_index));

struct task_struct {
    int pid;
    int tgid;
    int exit_code;
    __u64 start_time;
    struct task_struct *real_parent;
    struct mm_struct *mm;
    struct pid *thread_pid;
} __attribute__((preserve_access_index));

#define RING_BYTES (8 << 20)
#define WAKE_BYTES (RING_BYTES / 2) /* wake the reader early only when half full */

struct {
    __uint(type, BPF_MAP_TYPE_RINGBUF);
    __uint(max_entries, RING_BYTES);
} events SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 4096);
    __type(key, __u32);                /* pid namespace inode */
    __type(value, struct emon_watch); /* its slot, and which namespace of that inode */
} watched SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 16384);
    __type(key, struct emon_ns_key);
    __type(value, __u8);
} ignored SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 2);
    __type(key, __u32);
    __type(value, __u64);
} ctl SEC(".maps");

struct where {
    __u32 flags, inum, slot, pad;
    __u64 reaper_start;
};

/* Is `t` in a watched container (1), in a namespace the loader must place (2), or
 * neither (0)? Fills `w`. */
static __always_inline int classify(struct task_struct *t, struct where *w) {
    struct pid *p = BPF_CORE_READ(t, thread_pid);
    unsigned int level = BPF_CORE_READ(p, level);
    if (level == 0) return 0; /* the host's own pid namespace */
    struct upid up = {};
    if (bpf_core_read(&up, sizeof up, &p->numbers[level]) != 0) return 0;
    if (up.nr == 1) w->flags |= EMON_NS_INIT;
    struct pid_namespace *ns = up.ns;
    __u32 inum0 = BPF_CORE_READ(ns, ns.inum);
#pragma unroll
    for (int i = 0; i < EMON_NS_DEPTH; i++) {
        __u32 inum = BPF_CORE_READ(ns, ns.inum);
        struct emon_watch *watch = bpf_map_lookup_elem(&watched, &inum);
        if (watch) {
            /* which namespace of that inode: a dead one's inode can name a new one, which
             * is then one to place (below), not the slot's */
            __u64 start = BPF_CORE_READ(ns, child_reaper, start_time);
            if (watch->reaper_start == 0 || watch->reaper_start == start) {
                w->inum = inum;
                w->slot = watch->slot;
                w->reaper_start = start;
                return 1;
            }
        }
        if (BPF_CORE_READ(ns, level) <= 1) break;
        ns = BPF_CORE_READ(ns, parent);
    }
    __u32 k = EMON_CTL_CATCH_NEW;
    __u64 *catch_new = bpf_map_lookup_elem(&ctl, &k);
    if (!catch_new || !*catch_new) return 0;
    struct emon_ns_key key = {.inum = inum0};
    key.reaper_start = BPF_CORE_READ(up.ns, child_reaper, start_time);
    if (bpf_map_lookup_elem(&ignored, &key)) return 0;
    w->flags |= EMON_UNKNOWN_NS;
    w->inum = inum0;
    w->reaper_start = key.reaper_start;
    w->slot = 0;
    return 2;
}

/* Wake the reader now for a record of a namespace it must place (it reads the process's
 * cgroup, which a short-lived sandbox's processes take with them when they exit), or when
 * the buffer is half full; else the reader's timer drains it. */
static __always_inline __u64 wake_flag(const struct where *w) {
    if (w->flags & EMON_UNKNOWN_NS) return BPF_RB_FORCE_WAKEUP;
    return bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) > WAKE_BYTES ? BPF_RB_FORCE_WAKEUP
                                                                      : BPF_RB_NO_WAKEUP;
}

static __always_inline void lost(void) {
    __u32 k = EMON_CTL_LOST;
    __u64 *n = bpf_map_lookup_elem(&ctl, &k);
    if (n) __sync_fetch_and_add(n, 1);
}

static __always_inline void fill(struct emon_head *h, __u32 kind, const struct where *w) {
    h->kind = kind;
    h->flags = w->flags;
    h->ts = bpf_ktime_get_ns();
    h->reaper_start = w->reaper_start;
    h->ns_inum = w->inum;
    h->slot = w->slot;
    h->status = 0;
    h->argv_len = 0;
}

SEC("tp_btf/sched_process_fork")
int BPF_PROG(sf_fork, struct task_struct *parent, struct task_struct *child) {
    int pid = BPF_CORE_READ(child, pid), tgid = BPF_CORE_READ(child, tgid);
    if (pid != tgid) return 0; /* a thread, not a process */
    struct where w = {};
    if (!classify(child, &w)) return 0;
    struct emon_head *h = bpf_ringbuf_reserve(&events, sizeof *h, 0);
    if (!h) {
        lost();
        return 0;
    }
    fill(h, EMON_FORK, &w);
    h->pid = tgid;
    h->ppid = BPF_CORE_READ(parent, tgid);
    h->comm[0] = 0;
    bpf_ringbuf_submit(h, wake_flag(&w));
    return 0;
}

SEC("tp_btf/sched_process_exec")
int BPF_PROG(sf_exec, struct task_struct *p, int old_pid, void *bprm) {
    struct where w = {};
    if (!classify(p, &w)) return 0;
    struct emon_exec *e = bpf_ringbuf_reserve(&events, sizeof *e, 0);
    if (!e) {
        lost();
        return 0;
    }
    fill(&e->h, EMON_EXEC, &w);
    e->h.pid = BPF_CORE_READ(p, tgid);
    e->h.ppid = BPF_CORE_READ(p, real_parent, tgid);
    bpf_get_current_comm(e->h.comm, sizeof e->h.comm);
    unsigned long start = BPF_CORE_READ(p, mm, arg_start);
    unsigned long end = BPF_CORE_READ(p, mm, arg_end);
    __u32 len = 0;
    if (end > start) {
        unsigned long want = end - start;
        if (want > EMON_ARGV_MAX) {
            want = EMON_ARGV_MAX;
            e->h.flags |= EMON_TRUNCATED;
        }
        len = (__u32)want;
        if (len > EMON_ARGV_MAX) len = EMON_ARGV_MAX; /* for the verifier */
        if (bpf_probe_read_user(e->argv, len, (const void *)start) != 0) len = 0;
    }
    e->h.argv_len = len;
    bpf_ringbuf_submit(e, wake_flag(&w));
    return 0;
}

SEC("tp_btf/sched_process_exit")
int BPF_PROG(sf_exit, struct task_struct *p) {
    int pid = BPF_CORE_READ(p, pid), tgid = BPF_CORE_READ(p, tgid);
    if (pid != tgid) return 0; /* a thread ended */
    struct where w = {};
    if (!classify(p, &w)) return 0;
    struct emon_head *h = bpf_ringbuf_reserve(&events, sizeof *h, 0);
    if (!h) {
        lost();
        return 0;
    }
    fill(h, EMON_EXIT, &w);
    h->pid = tgid;
    h->ppid = BPF_CORE_READ(p, real_parent, tgid);
    h->status = BPF_CORE_READ(p, exit_code);
    h->comm[0] = 0;
    bpf_ringbuf_submit(h, wake_flag(&w));
    return 0;
}
