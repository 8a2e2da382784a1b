/* qtrace: everything shared between the BPF programs and user space.
 *
 * This header is the single definition of the event ABI. agent/abi.py derives the enums
 * from it by parsing, and mirrors the structs; tests/test_abi.py compiles this header with
 * the host compiler and checks every offset and size against the Python side.
 */
#ifndef QTRACE_H
#define QTRACE_H

#ifndef QT_BPF
#include <stdint.h>
typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
typedef int32_t s32;
typedef int64_t s64;
#endif

/* Bytes of a request's first read handed to the query-id extractor (overridable with -D). */
#ifndef QT_CAP_BYTES
#define QT_CAP_BYTES 256
#endif

/* Event kinds: the syscall or tracepoint an event comes from. */
enum qt_kind {
	QT_K_NONE = 0,
	QT_K_ACCEPT = 1,
	QT_K_ACCEPT4 = 2,
	QT_K_CONNECT = 3,
	QT_K_READ = 4,
	QT_K_READV = 5,
	QT_K_RECVFROM = 6,
	QT_K_RECVMSG = 7,
	QT_K_WRITE = 8,
	QT_K_WRITEV = 9,
	QT_K_SENDTO = 10,
	QT_K_SENDMSG = 11,
	QT_K_SENDFILE64 = 12,
	QT_K_SPLICE = 13,
	QT_K_CLOSE = 14,
	QT_K_OPENAT = 15,
	QT_K_PREAD64 = 16,
	QT_K_PREADV = 17,
	QT_K_PWRITE64 = 18,
	QT_K_PWRITEV = 19,
	QT_K_FSYNC = 20,
	QT_K_FDATASYNC = 21,
	QT_K_RENAME = 22,
	QT_K_RENAMEAT2 = 23,
	QT_K_FTRUNCATE = 24,
	QT_K_UNLINK = 25,
	QT_K_UNLINKAT = 26,
	QT_K_INET_SOCK_SET_STATE = 27,
	QT_K_TCP_RETRANSMIT_SKB = 28,
	QT_K_BLOCK_RQ = 29,
	QT_K_EXEC = 30,
	/* Waiting for sockets: where a thread with a timeout spends its network time. */
	QT_K_POLL = 31,
	QT_K_PPOLL = 32,
	QT_K_EPOLL_WAIT = 33,
	QT_K_EPOLL_PWAIT = 34,
	QT_K_SELECT = 35,
	QT_K_PSELECT6 = 36,
	/* Runnable but not running: a request thread waiting for a CPU (sched group). */
	QT_K_RUNQ = 37,
	/* File locks. Node-wide when lock context is on: whoever holds a lock a request
	 * waits for is usually not a traced process. */
	QT_K_FLOCK = 38,
	/* A request thread asleep in a page fault (memory group): a major fault on an
	 * mmapped file is a storage read the syscalls never show. */
	QT_K_PAGE_FAULT = 39,
	/* A request thread waiting for its process's mmap_lock (memory group). */
	QT_K_MMAP_LOCK = 40,
	/* A request thread asleep outside any traced syscall (sched group): a sleep, a
	 * futex, a lock of the runtime. */
	QT_K_OFFCPU = 41,
	/* POSIX and OFD record locks (fcntl F_SETLK[W], F_OFD_SETLK[W] only): node-wide with
	 * lock context, like flock. */
	QT_K_FCNTL = 42,
	QT_K_MAX = 43,
};

/* What an fd is, as far as the kernel side knows (user space teaches it the rest). */
enum qt_fdtype {
	QT_FD_UNKNOWN = 0,
	QT_FD_SOCK_IN = 1,  /* accepted: requests arrive on it */
	QT_FD_SOCK_OUT = 2, /* connected: sub-requests leave on it */
	QT_FD_SOCK = 3,     /* a socket of no known direction */
	QT_FD_FILE = 4,     /* a regular file */
	QT_FD_OTHER = 5,    /* pipe, eventfd, tty...: suppressed in the kernel */
};

/* Event flags. */
enum qt_flag {
	QT_F_REQ_START = 1, /* this read started a new request (payload holds its first bytes) */
	QT_F_INFERRED = 2,  /* request key inherited by a thread the request thread created */
	QT_F_NO_ENTER = 4,  /* exit seen without its enter: timestamps are the exit's */
	QT_F_REQ_CONT = 8,  /* a later read of a request being captured (payload continues it) */
};

/* Payload kinds: what follows struct qt_event when payload_len > 0. */
enum qt_payload {
	QT_P_NONE = 0,
	QT_P_REQUEST = 1,  /* first bytes of a request */
	QT_P_PATH = 2,     /* NUL-terminated path */
	QT_P_PATH2 = 3,    /* two NUL-terminated paths at 0 and QT_CAP_BYTES/2 (rename) */
	QT_P_SOCKADDR = 4, /* raw struct sockaddr from connect/accept */
	QT_P_TUPLE = 5,    /* struct qt_tuple from a TCP tracepoint */
	QT_P_REQUEST_CONT = 6, /* more bytes of a request (capture sessions only) */
	QT_P_COMM = 7,         /* a task name (the one that ran while we waited) */
	QT_P_PATH_HASH = 8,    /* u32 FNV-1a of an absolute path user space was sent before */
};

/* Counters, per kind and per CPU: index kind * QT_C_MAX + counter. */
enum qt_counter {
	QT_C_PRODUCED = 0,     /* events due to leave the kernel */
	QT_C_LOST_RINGBUF = 1, /* ...lost because the ring buffer was full */
	QT_C_LOST_MAPFULL = 2, /* ...lost because a tracking map was full */
	QT_C_FILTERED = 3,     /* syscalls suppressed on fds of no interest (not a loss) */
	QT_C_SHED = 4,         /* over the session's event-rate limit: counted, not shipped */
	QT_C_RECORDED = 5,     /* kept in the recent history (flight recorder), not shipped */
	QT_C_MAX = 6,
};

/* Record kinds in the ring buffers. */
enum qt_record {
	QT_R_EVENT = 1,
};

struct qt_event {
	u64 ts_enter;  /* bpf_ktime_get_ns() at syscall enter (CLOCK_MONOTONIC) */
	u64 ts_exit;   /* at syscall exit; block I/O: issue and completion */
	u64 cgroup_id; /* cgroup v2 id of the task */
	u64 req_key;   /* kernel-assigned request key, 0 = none */
	s64 ret;       /* syscall return value; tracepoints: kind-specific */
	u64 arg0;      /* kind-specific: file offset, block sector, other fd, old TCP state */
	u64 arg1;      /* kind-specific: byte count, block dev/size, new TCP state */
	u32 tgid;
	u32 tid;
	s32 fd;
	u16 kind;    /* enum qt_kind */
	u8 fdtype;   /* enum qt_fdtype */
	u8 flags;    /* enum qt_flag */
	u16 payload_len;
	u16 payload_kind; /* enum qt_payload */
	u32 record;       /* enum qt_record */
	char comm[16];
};

/* Flight recorder: one slot of the per-CPU recent history. Events whose payload fits
 * (none, a task name, a TCP tuple) stay here; the rest leave the kernel at once. */
#define QT_HIST_PAYLOAD 40
struct qt_hslot {
	struct qt_event e;
	u8 payload[QT_HIST_PAYLOAD];
};

/* Flight recorder: the longest query id the kernel extracts itself (longer ones are left
 * to user space, which never truncates an id). */
#define QT_QID_MAX 48

/* Flight recorder: where a request's time went, kept per request key in the kernel and
 * read once per request. Categories are explain's breakdown (collector/explain.py). */
enum qt_sumcat {
	QT_S_NET = 0,
	QT_S_STORAGE = 1,
	QT_S_BLOCK = 2,
	QT_S_RUNQ = 3,
	QT_S_LOCK = 4,
	QT_S_PFAULT = 5,
	QT_S_OFFCPU = 6,
	QT_S_OFFCPU_MAIN = 7,    /* ...of it, the request thread's own sleeps */
	QT_S_WAITS_OTHERS = 8,   /* waits of the request's other threads */
	QT_S_MAX = 9,
};

struct qt_reqsum {
	u64 start;             /* end of the read that received the request */
	u64 end;               /* end of the last response write so far; 0: none yet */
	u64 last;              /* end of the request's latest event */
	u64 ns[QT_S_MAX];      /* time per category since start */
	u64 at_end[QT_S_MAX];  /* ns as it was at the last response write */
	u32 tgid;
	u32 tid;               /* the thread that read the request */
	s32 fd;                /* the connection it arrived on */
	u32 events;
	u32 events_at_end;
	u32 qid_len;           /* the query id found in the kernel (QT_QID_KERNEL); 0: none */
	char qid[QT_QID_MAX];
};

/* Addresses from TCP tracepoints, IPv4 in the first 4 bytes of the address arrays. */
struct qt_tuple {
	u16 family;
	u16 sport;
	u16 dport;
	u16 _pad;
	u8 saddr[16];
	u8 daddr[16];
};

/* Key of the per-process fd table the kernel keeps for attribution and filtering. */
struct qt_fdkey {
	u32 tgid;
	s32 fd;
};

struct qt_fdinfo {
	u64 req_key; /* request currently served on this connection */
	u8 type;     /* enum qt_fdtype */
	u8 last_dir; /* 0 none, 1 read, 2 write: a read after a write starts a request */
	u8 node;     /* a neighbour's fd on a file of the targets (node group) */
	u8 _pad;
	u32 captured; /* request bytes shipped so far (capture sessions follow later reads) */
};

#endif /* QTRACE_H */
