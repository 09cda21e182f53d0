/*
 * The records the eBPF program (ebpfmon.bpf.c) hands its loader (ebpfmon.c) through
 * the ring buffer. Shared by both sides; plain fixed-size types only.
 */
#ifndef SANDFLEET_EBPFMON_H
#define SANDFLEET_EBPFMON_H

#define EMON_FORK 1
#define EMON_EXEC 2
#define EMON_EXIT 3

#define EMON_UNKNOWN_NS 1 /* not a watched namespace: sent while a watch awaits its own */
#define EMON_TRUNCATED 2  /* argv was longer than EMON_ARGV_MAX and was cut */
#define EMON_NS_INIT 4    /* the process is pid 1 of its namespace (its reaper) */

#define EMON_ARGV_MAX 4096
#define EMON_COMM_LEN 16
#define EMON_CTL_CATCH_NEW 0 /* ctl[0]: nonzero while a watched container has no known ns */
#define EMON_CTL_LOST 1      /* ctl[1]: records the ring buffer had no room for */
#define EMON_NS_DEPTH 4      /* namespaces looked at: the task's and its ancestors' */

struct emon_ns_key { /* an ignored namespace: its inode and its reaper's start time */
    __u32 inum;
    __u32 pad;
    __u64 reaper_start;
};

struct emon_watch { /* the `watched` map's value: whose namespace this inode is */
    __u32 slot;         /* slot + 1 */
    __u32 pad;
    __u64 reaper_start; /* its reaper's start time; 0 until the loader knows it */
};

struct emon_head {
    __u32 kind;
    __u32 flags;
    __u64 ts;           /* bpf_ktime_get_ns: CLOCK_MONOTONIC, as the connector's */
    __u64 reaper_start; /* the namespace's reaper's start time: with the inode, which one */
    __u32 ns_inum;      /* the pid namespace's inode (its /proc/<pid>/ns/pid) */
    __u32 slot;         /* the watched container's slot + 1 (0: unknown namespace) */
    __s32 pid;          /* host tgid; a fork's child */
    __s32 ppid;         /* host tgid of the parent */
    __s32 status;       /* exit: the raw wait status */
    __u32 argv_len;     /* exec: bytes of argv that follow (NUL-separated) */
    char comm[EMON_COMM_LEN]; /* exec: the new program's name, when argv is unreadable */
};

struct emon_exec {
    struct emon_head h;
    char argv[EMON_ARGV_MAX];
};

#endif
