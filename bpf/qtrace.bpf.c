/* qtrace node probes (BCC). Tracepoints only: kprobes and fentry do not work on the kernels
 * qtrace targets. Kernel structs are never read (the available headers do not match the
 * running kernel); everything comes from tracepoint args and helpers.
 *
 * Cost discipline: an untraced task pays two hash lookups per traced syscall and leaves.
 * Events of traced tasks are reserved in a ring buffer and submitted without a wakeup; the
 * agent drains it on a timer. Every place an event can be lost is counted per kind.
 */
#define QT_BPF 1
#include <uapi/linux/ptrace.h>
#include <linux/signal.h> /* sigset_t, in the ppoll and epoll_pwait tracepoint args */
#include "qtrace.h"

#ifndef QT_RB_PAGES
#define QT_RB_PAGES 1024
#endif
#ifndef QT_MAX_THREADS
#define QT_MAX_THREADS 65536
#endif
#ifndef QT_MAX_FDS
#define QT_MAX_FDS 262144
#endif

/* Probe groups compiled in (agent/probes.py sets them from the session's groups). */
#ifndef QT_SCHED
#define QT_SCHED 1
#endif
#ifndef QT_MEMORY
#define QT_MEMORY 1
#endif
#ifndef QT_NODE
#define QT_NODE 0
#endif
/* Flight recorder (agent/probes.py): events stay in a per-CPU overwriting history that
 * user space maps and reads only when a query turns out to matter; requests are summed
 * per request key. Off: every event leaves through the ring buffer (full capture). */
#ifndef QT_RECORDER
#define QT_RECORDER 0
#endif
#ifndef QT_HIST_SLOTS
#define QT_HIST_SLOTS 4096 /* per CPU */
#endif
#ifndef QT_HIST_CPUS
#define QT_HIST_CPUS 1
#endif
/* Recorder with a header extractor: the query id is found in the kernel (lower-case
 * header name), so a request's first read need not leave it. */
#ifndef QT_QID_KERNEL
#define QT_QID_KERNEL 0
#endif
#ifndef QT_QID_NAME_LEN
#define QT_QID_NAME_LEN 10
#endif

#define QT_EINPROGRESS 115
#define QT_TCP_ESTABLISHED 1
#define QT_TCP_CLOSE 7
#define QT_TCP_LISTEN 10
#define QT_SOCKADDR_BYTES 28

struct qt_inflight {
	u64 ts;
	u64 arg0;
	u64 arg1;
	u64 p0; /* user pointers read at exit (buffers, paths, sockaddrs) */
	u64 p1;
	s32 fd;
	u16 kind;
	u8 fdtype;
	u8 _pad;
};

struct qt_thread {
	u64 req_key;
	u32 flags;
	u32 tgid;
};

struct qt_runq {
	u64 since; /* when the thread became runnable */
	u64 cgroup_id;
};

struct qt_blkkey {
	u64 sector;
	u32 dev;
	u32 _pad;
};

struct qt_blkinfo {
	u64 ts;
	u64 req_key;
	u64 cgroup_id;
	u32 tgid;
	u32 tid;
	char comm[16];
};

/* Targets, updated live by the agent. tgid values: 1 = named by the agent, 2 = followed
 * into a child the kernel saw being created. */
BPF_HASH(traced_tgids, u32, u8, 16384);
BPF_HASH(traced_cgroups, u64, u8, 16384);
BPF_HASH(traced_ports, u16, u8, 1024);   /* listening ports of traced tasks */
/* LRU: sockets whose close we never see must not fill these for good. */
BPF_TABLE("lru_hash", u64, u32, traced_socks, 65536); /* struct sock * -> tgid */
BPF_TABLE("lru_hash", u64, u64, sock_since, 65536);   /* struct sock * -> phase start */
/* [0]: report execs (name targets); [1]: capture requests; [2]: node-wide lock context;
 * [3]: the session's event-rate limit per CPU, events/s (0: none) */
BPF_ARRAY(config, u64, 4);

/* Per CPU token bucket of the rate limit. Over the limit, events are counted (shed) and
 * one in QT_SAMPLE_EVERY still leaves: the traced service never waits for qtrace. */
struct qt_bucket {
	u64 last;
	u64 milli; /* tokens, in thousandths of an event */
	u64 over;
};
BPF_PERCPU_ARRAY(bucket, struct qt_bucket, 1);
#define QT_SAMPLE_EVERY 64
#define QT_BURST_MS 100 /* a burst of this long at the full rate passes */

BPF_HASH(inflight, u32, struct qt_inflight, QT_MAX_THREADS);
BPF_HASH(threads, u32, struct qt_thread, QT_MAX_THREADS);
BPF_HASH(fds, struct qt_fdkey, struct qt_fdinfo, QT_MAX_FDS);
BPF_TABLE("lru_hash", struct qt_blkkey, struct qt_blkinfo, blk, 8192);
BPF_HASH(runq, u32, struct qt_runq, QT_MAX_THREADS);

/* Per CPU: since when the current task runs, and the longest slice that ended lately.
 * A thread that waited for a CPU is charged to the task that took it longest during
 * the wait, not merely to the one that happened to run last. */
struct qt_slice {
	u64 since;
	u64 len;
	u64 ended;
	u32 pid;
	u32 _pad;
	char comm[16];
};
BPF_PERCPU_ARRAY(cpu_cur, struct qt_slice, 1);
BPF_PERCPU_ARRAY(cpu_top, struct qt_slice, 1);
#define QT_TOP_STALE_NS 100000000ULL
#ifndef QT_RUNQ_MIN_NS
#define QT_RUNQ_MIN_NS 100000 /* shorter waits are counted, not shipped */
#endif
/* Sleeps of request threads outside traced syscalls (sched and memory groups). */
struct qt_pf {
	u64 ts;
	u64 addr;
};
struct qt_sleep {
	u64 since;
	u64 addr;     /* page faults: the faulting address */
	u64 fault_ts; /* page faults: when the fault began */
	u32 tgid;
	u16 kind;     /* QT_K_PAGE_FAULT or QT_K_OFFCPU */
	u16 _pad;
};
BPF_HASH(pfault, u32, struct qt_pf, QT_MAX_THREADS);
BPF_HASH(asleep, u32, struct qt_sleep, QT_MAX_THREADS);
#define QT_PF_RECENT_NS 1000000ULL /* a fault that sleeps does so within this */
#define QT_PF_MIN_NS 20000ULL

/* mmap_lock: who holds each traced process's lock, and who of ours waits for it. */
struct qt_holder {
	u64 ts;
	u64 released;
	u32 tgid;
	u32 tid;
	u8 write;
	u8 _pad[7];
	char comm[16];
};
struct qt_mmwait {
	u64 ts;
	u64 mm;
	u8 write;
	u8 _pad[7];
	struct qt_holder holder; /* at the start of the wait: a holder may be gone by its end */
};
BPF_TABLE("lru_hash", u64, u8, mm_watch, 4096); /* LRU: a dead mm is never seen leaving */
BPF_TABLE("lru_hash", u64, struct qt_holder, mm_holder, 4096);   /* the latest to take it */
BPF_TABLE("lru_hash", u64, struct qt_holder, mm_released, 4096); /* the latest to let it go */
BPF_HASH(mmwait, u32, struct qt_mmwait, QT_MAX_THREADS);
#define QT_MMLOCK_MIN_NS 20000ULL

/* Node group: hashes of the base names of the targets' files, and their disks. */
BPF_HASH(watched_names, u32, u8, 65536);
BPF_HASH(watched_devs, u32, u8, 64);
struct qt_path {
	u8 b[QT_CAP_BYTES];
};
BPF_PERCPU_ARRAY(scratch, struct qt_path, 1);

BPF_ARRAY(keyseq, u64, 1);
BPF_PERCPU_ARRAY(counters, u64, QT_K_MAX * QT_C_MAX);

BPF_RINGBUF_OUTPUT(events, QT_RB_PAGES);
/* Control records (execs) travel apart so that a flood of data cannot drown them. */
BPF_RINGBUF_OUTPUT(control, 16);

static __always_inline void count(u16 kind, int c)
{
	int idx = kind * QT_C_MAX + c;
	u64 *v = counters.lookup(&idx);
	if (v)
		(*v)++;
}

#if QT_NODE
/* Processes traced through their cgroup (pods), learned as they make syscalls: the node
 * group watches their /proc entries as it does those of processes traced by pid. */
BPF_TABLE("lru_hash", u32, u8, cgroup_tgids, 16384);
#endif

static __always_inline int traced(u32 tgid)
{
	if (traced_tgids.lookup(&tgid))
		return 1;
	u64 cg = bpf_get_current_cgroup_id();
	if (!traced_cgroups.lookup(&cg))
		return 0;
#if QT_NODE
	if (!cgroup_tgids.lookup(&tgid)) {
		u8 one = 1;
		cgroup_tgids.update(&tgid, &one);
	}
#endif
	return 1;
}

static __always_inline int admit(u16 kind)
{
	int three = 3, z = 0;
	u64 *rate = config.lookup(&three);
	if (!rate || !*rate)
		return 1;
	struct qt_bucket *b = bucket.lookup(&z);
	if (!b)
		return 1;
	u64 now = bpf_ktime_get_ns(), dt = now - b->last;
	if (dt > 1000000000ULL)
		dt = 1000000000ULL;
	b->last = now;
	u64 milli = b->milli + dt * *rate / 1000000, cap = *rate * QT_BURST_MS;
	b->milli = milli > cap ? cap : milli;
	if (b->milli >= 1000) {
		b->milli -= 1000;
		return 1;
	}
	if (++b->over % QT_SAMPLE_EVERY == 0)
		return 1;
	count(kind, QT_C_SHED);
	return 0;
}

/* Events are built in a per-CPU buffer (programs do not nest on a CPU) and then leave
 * the kernel or go to the recent history, wherever they were built. */
struct qt_evbuf {
	struct qt_event e;
	u8 payload[QT_CAP_BYTES];
};
BPF_PERCPU_ARRAY(evbuf, struct qt_evbuf, 1);

static __always_inline struct qt_event *reserve(u16 kind, int big)
{
	int z = 0;
	struct qt_evbuf *b = evbuf.lookup(&z);
	return b ? &b->e : 0;
}

/* How far an event's payload reaches: no payload or a task name fits a history slot;
 * paths, request bytes and addresses teach user space, so they always leave at once. */
#define QT_OUT_SMALL 1
#define QT_OUT_BIG 2

#if QT_RECORDER
BPF_F_TABLE("array", u32, struct qt_hslot, history, QT_HIST_CPUS * QT_HIST_SLOTS,
	    BPF_F_MMAPABLE);
/* Per CPU: slots written so far. Advanced after the slot is written, so user space
 * knows every slot below it is whole. */
BPF_PERCPU_ARRAY(hist_head, u64, 1);
BPF_TABLE("lru_hash", u64, struct qt_reqsum, reqsums, 65536);

static __always_inline void hist_put(struct qt_event *e)
{
	int z = 0;
	u64 *h = hist_head.lookup(&z);
	u32 cpu = bpf_get_smp_processor_id();
	if (!h || cpu >= QT_HIST_CPUS) {
		count(e->kind, QT_C_LOST_MAPFULL);
		return;
	}
	u32 k = cpu * QT_HIST_SLOTS + (u32)(*h % QT_HIST_SLOTS);
	struct qt_hslot *slot = history.lookup(&k);
	if (!slot)
		return;
	__builtin_memcpy(slot, e, sizeof(struct qt_hslot));
	*h += 1;
	count(e->kind, QT_C_RECORDED);
}

static __always_inline int sum_category(struct qt_event *e)
{
	switch (e->kind) {
	case QT_K_BLOCK_RQ:
		return QT_S_BLOCK;
	case QT_K_RUNQ:
		return QT_S_RUNQ;
	case QT_K_FLOCK:
	case QT_K_FCNTL:
	case QT_K_MMAP_LOCK:
		return QT_S_LOCK;
	case QT_K_PAGE_FAULT:
		return QT_S_PFAULT;
	case QT_K_OFFCPU:
		return QT_S_OFFCPU;
	case QT_K_POLL:
	case QT_K_PPOLL:
	case QT_K_EPOLL_WAIT:
	case QT_K_EPOLL_PWAIT:
	case QT_K_SELECT:
	case QT_K_PSELECT6:
		return QT_S_NET;
	case QT_K_OPENAT:
	case QT_K_FSYNC:
	case QT_K_FDATASYNC:
	case QT_K_RENAME:
	case QT_K_RENAMEAT2:
	case QT_K_FTRUNCATE:
	case QT_K_UNLINK:
	case QT_K_UNLINKAT:
		return QT_S_STORAGE;
	case QT_K_INET_SOCK_SET_STATE:
	case QT_K_TCP_RETRANSMIT_SKB:
	case QT_K_EXEC:
		return -1;
	}
	if (e->fdtype == QT_FD_FILE)
		return QT_S_STORAGE;
	if (e->fdtype >= QT_FD_SOCK_IN && e->fdtype <= QT_FD_SOCK)
		return QT_S_NET;
	return -1;
}

static __always_inline int is_response_kind(u16 kind)
{
	return kind == QT_K_WRITE || kind == QT_K_WRITEV || kind == QT_K_SENDTO ||
	       kind == QT_K_SENDMSG || kind == QT_K_SENDFILE64;
}

/* Add an event to its request's summary. The hop is what explain measures: from the end
 * of the request read to the end of the last response write on that connection. */
static __always_inline void summarize(struct qt_event *e)
{
	u64 key = e->req_key;
	if (!key)
		return;
	/* Made by start_request: a request seen from its start, with an id if ids are
	 * found here. */
	struct qt_reqsum *s = reqsums.lookup(&key);
	if (!s)
		return;
	if (e->flags & QT_F_REQ_START) {
		s->start = e->ts_exit;
		s->last = e->ts_exit;
		s->tgid = e->tgid;
		s->tid = e->tid;
		s->fd = e->fd;
		return;
	}
	s->events++;
	if (e->ts_exit > s->last)
		s->last = e->ts_exit;
	int c = sum_category(e);
	if (c >= 0 && c < QT_S_MAX) {
		u64 from = e->ts_enter > s->start ? e->ts_enter : s->start;
		u64 d = e->ts_exit > from ? e->ts_exit - from : 0;
		s->ns[c] += d;
		if (c == QT_S_OFFCPU) {
			if (e->tid == s->tid)
				s->ns[QT_S_OFFCPU_MAIN] += d;
		} else if (e->tid != s->tid && c != QT_S_BLOCK) {
			s->ns[QT_S_WAITS_OTHERS] += d;
		}
	}
	if (e->tgid == s->tgid && e->fd == s->fd && e->fdtype == QT_FD_SOCK_IN &&
	    is_response_kind(e->kind)) {
		s->end = e->ts_exit;
		__builtin_memcpy(s->at_end, s->ns, sizeof(s->ns));
		s->events_at_end = s->events;
	}
}

BPF_PERCPU_ARRAY(sumbuf, struct qt_reqsum, 1);

/* The value of the query-id header in a request's first bytes: its length, 0 when the
 * header is not there, -1 when the kernel cannot tell (too long, or cut off). */
/* The header's name as the id search compares it: its bytes (lower case) and a mask of
 * them, in two words; set by the agent at load. Names up to 16 bytes are searched here. */
struct qt_qidname {
	u64 w[2];
	u64 mask[2];
	u32 len;
	u32 _pad;
};
BPF_ARRAY(qid_name, struct qt_qidname, 1);

/* The value of the query-id header in a request's first bytes: its length, 0 when the
 * header is not there, -1 when the kernel cannot tell (too long, or cut off). Each line
 * start is compared whole (16 bytes at once, letters folded to lower case) so that the
 * loop carries no state the verifier would have to follow byte by byte. */
static __always_inline int extract_qid(const u8 *pl, u32 len, char *out)
{
	int z = 0;
	struct qt_qidname *nm = qid_name.lookup(&z);
	if (!nm || nm->len == 0 || nm->len > 16)
		return -1;
	u32 nlen = nm->len, start = 0;
	for (u32 i = 0; i < QT_CAP_BYTES; i++) {
		if (i + nlen + 1 > len)
			return 0;
		if (i > 0 && pl[(i - 1) & (QT_CAP_BYTES - 1)] != '\n')
			continue;
		u64 w[2] = {};
		bpf_probe_read_kernel(w, sizeof(w), pl + i);
		/* 0x20 folds A-Z to a-z; what else it changes cannot equal a name byte
		 * that is a token character, except '\r' as '-': a header line would still
		 * have to follow. */
		if (((w[0] | 0x2020202020202020ULL) & nm->mask[0]) != nm->w[0] ||
		    ((w[1] | 0x2020202020202020ULL) & nm->mask[1]) != nm->w[1])
			continue;
		u32 j = i + nlen;
		if (j < QT_CAP_BYTES && pl[j] == ':') {
			start = j + 1;
			break;
		}
	}
	if (!start)
		return 0;
	u8 v[QT_QID_MAX + 8] = {};
	bpf_probe_read_kernel(v, sizeof(v), pl + start);
	u32 avail = len > start ? len - start : 0;
	/* Blanks after the colon, then the value to the end of its line (each loop keeps one
	 * variable: the verifier follows them cheaply). */
	u32 first = 8;
	for (u32 k = 0; k < 8; k++) {
		if (v[k] != ' ' && v[k] != '\t') {
			first = k;
			break;
		}
	}
	if (first >= 8)
		return -1;
	bpf_probe_read_kernel(out, QT_QID_MAX, pl + start + first);
	u32 n = QT_QID_MAX + 1;
	for (u32 k = 0; k < QT_QID_MAX; k++) {
		if (first + k >= avail)
			return -1; /* the line goes on past what was captured */
		u8 c = out[k];
		if (c == '\r' || c == '\n') {
			n = k;
			break;
		}
	}
	if (n > QT_QID_MAX) {
		/* As long as the kernel keeps: fine if the line ends right there. */
		u8 c = 0;
		if (first + QT_QID_MAX >= avail)
			return -1;
		bpf_probe_read_kernel(&c, 1, pl + start + first + QT_QID_MAX);
		if (c != '\r' && c != '\n')
			return -1; /* longer than the kernel keeps: user space decides */
		n = QT_QID_MAX;
	}
	for (u32 k = 0; k < QT_QID_MAX; k++) {
		if (n == 0 || (out[(n - 1) & 63] != ' ' && out[(n - 1) & 63] != '\t'))
			break;
		n--;
	}
	return n;
}

/* A request begins: its summary starts, with the query id when the kernel found it
 * (found > 0; -1: user space will find it from the request's bytes). */
static __always_inline void start_request(struct qt_event *e, int found)
{
	int z = 0;
	struct qt_reqsum *sb = sumbuf.lookup(&z);
	if (!sb)
		return;
	u64 key = e->req_key;
	if (found > 0) {
		sb->qid_len = found;
	} else {
		__builtin_memset(sb, 0, sizeof(*sb));
		sb->fd = -1;
	}
	reqsums.update(&key, sb);
}

/* Paths user space was sent, per process: later opens of the same absolute path carry
 * its hash only and stay in the recent history. */
struct qt_pathkey {
	u32 tgid;
	u32 hash;
};
BPF_TABLE("lru_hash", struct qt_pathkey, u8, paths_sent, 65536);

static __always_inline u32 path_hash(const u8 *p)
{
	u32 h = 2166136261u;
	for (int i = 0; i < QT_CAP_BYTES; i++) {
		u8 c = p[i];
		if (c == 0)
			break;
		h ^= c;
		h *= 16777619u;
	}
	return h;
}
#endif

static __always_inline int submit(struct qt_event *e, int out);

#if QT_QID_KERNEL
BPF_PROG_ARRAY(request_prog, 1);

/* Tail of a syscall exit that started a request (recorder sessions with a header
 * extractor): find the query id here, so that the request's bytes need not leave the
 * kernel unless the id cannot be read here or the session captures requests. */
int qt_request(void *ctx)
{
	int z = 0, one = 1;
	struct qt_evbuf *b = evbuf.lookup(&z);
	struct qt_reqsum *sb = sumbuf.lookup(&z);
	if (!b || !sb)
		return 0;
	struct qt_event *e = &b->e;
	__builtin_memset(sb, 0, sizeof(*sb));
	sb->fd = -1;
	u32 len = e->payload_len;
	int found = extract_qid(b->payload, len > QT_CAP_BYTES ? QT_CAP_BYTES : len, sb->qid);
	/* No id: nobody can ask about the request, so it is not summarised (its events stay
	 * in the history as the node's context). Unreadable here: user space looks. */
	if (found != 0)
		start_request(e, found);
	u64 *capture = config.lookup(&one);
	int out = found < 0 || (capture && *capture) ? QT_OUT_BIG : QT_OUT_SMALL;
	if (out == QT_OUT_SMALL && e->payload_len > QT_HIST_PAYLOAD)
		e->payload_len = QT_HIST_PAYLOAD;
	submit(e, out);
	return 0;
}
#endif

static __always_inline int submit(struct qt_event *e, int out)
{
#if QT_RECORDER
	summarize(e);
	if (out != QT_OUT_BIG) {
		hist_put(e);
		return 0;
	}
#endif
	if (!admit(e->kind))
		return -1;
	count(e->kind, QT_C_PRODUCED);
	long err;
	if (out)
		err = events.ringbuf_output(e, sizeof(struct qt_event) + QT_CAP_BYTES,
					    BPF_RB_NO_WAKEUP);
	else
		err = events.ringbuf_output(e, sizeof(struct qt_event), BPF_RB_NO_WAKEUP);
	if (err)
		count(e->kind, QT_C_LOST_RINGBUF);
	return err ? -1 : 0;
}

static __always_inline void fill_task(struct qt_event *e, u64 id)
{
	e->tgid = id >> 32;
	e->tid = (u32)id;
	e->cgroup_id = bpf_get_current_cgroup_id();
	bpf_get_current_comm(&e->comm, sizeof(e->comm));
	e->record = QT_R_EVENT;
	e->payload_len = 0;
	e->payload_kind = QT_P_NONE;
}

static __always_inline int is_fd_kind(u16 kind)
{
	return kind >= QT_K_READ && kind <= QT_K_SENDMSG;
}

static __always_inline int is_read_kind(u16 kind)
{
	return kind >= QT_K_READ && kind <= QT_K_RECVMSG;
}

/* ---- syscall enter: remember the arguments until the exit ---- */

static __always_inline int is_path_kind(u16 kind)
{
	return kind == QT_K_OPENAT || kind == QT_K_RENAME || kind == QT_K_RENAMEAT2 ||
	       kind == QT_K_UNLINK || kind == QT_K_UNLINKAT;
}

/* A syscall of an untraced task that still matters: a file lock (lock context), or in
 * the node group a path operation (kept at exit only if it names a target's file or
 * /proc entry) and any fd operation on a file of the targets. */
static __always_inline int node_wide(u16 kind, u32 tgid, s32 fd)
{
	if (kind == QT_K_FLOCK || kind == QT_K_FCNTL) {
		int two = 2;
		u64 *on = config.lookup(&two);
		if (on && *on)
			return 1;
	}
#if QT_NODE
	if (is_path_kind(kind))
		return 1;
	if (fd >= 0) {
		struct qt_fdkey k = {.tgid = tgid, .fd = fd};
		struct qt_fdinfo *fi = fds.lookup(&k);
		return fi && fi->node;
	}
#endif
	return 0;
}

static __always_inline int on_enter(u16 kind, s32 fd, u64 a0, u64 a1, u64 p0, u64 p1)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tgid = id >> 32, tid = (u32)id;
	if (!traced(tgid) && !node_wide(kind, tgid, fd))
		return 0;

	u8 fdtype = QT_FD_UNKNOWN;
	if (fd >= 0) {
		struct qt_fdkey k = {.tgid = tgid, .fd = fd};
		struct qt_fdinfo *fi = fds.lookup(&k);
		if (fi)
			fdtype = fi->type;
		/* Pipes, eventfds and ttys carry no query work; the agent marks them once. */
		if (fdtype == QT_FD_OTHER && (is_fd_kind(kind) || kind == QT_K_CLOSE)) {
			count(kind, QT_C_FILTERED);
			if (kind == QT_K_CLOSE)
				fds.delete(&k);
			return 0;
		}
		/* The fd number is free once close starts; forget it before anyone reuses it. */
		if (kind == QT_K_CLOSE && fi)
			fds.delete(&k);
	}

	struct qt_inflight f = {};
	f.ts = bpf_ktime_get_ns();
	f.arg0 = a0;
	f.arg1 = a1;
	f.p0 = p0;
	f.p1 = p1;
	f.fd = fd;
	f.kind = kind;
	f.fdtype = fdtype;
	if (inflight.update(&tid, &f)) {
		count(kind, QT_C_PRODUCED);
		count(kind, QT_C_LOST_MAPFULL);
	}
	return 0;
}

/* ---- request attribution (DESIGN.md, Attribution) ---- */

static __always_inline u64 new_key(void)
{
	int z = 0;
	u64 *seq = keyseq.lookup(&z);
	if (!seq)
		return 0;
	return __sync_fetch_and_add(seq, 1) + 1;
}

static __always_inline void set_thread_key(u32 tid, u64 key, u32 flags)
{
	struct qt_thread t = {.req_key = key, .flags = flags};
	t.tgid = bpf_get_current_pid_tgid() >> 32;
	threads.update(&tid, &t);
}

/* Pointer to the first buffer of a read, following iovecs and msghdrs. */
static __always_inline u64 first_buffer(u16 kind, u64 p0, u64 *cap)
{
	u64 vec = p0;
	if (kind == QT_K_RECVMSG) {
		/* struct user_msghdr: msg_iov at offset 16 (stable UAPI layout). */
		if (bpf_probe_read_user(&vec, sizeof(vec), (void *)(p0 + 16)))
			return 0;
	}
	if (kind == QT_K_READV || kind == QT_K_RECVMSG) {
		u64 iov[2];
		if (bpf_probe_read_user(iov, sizeof(iov), (void *)vec))
			return 0;
		if (iov[1] < *cap)
			*cap = iov[1];
		return iov[0];
	}
	return p0;
}

/* ---- node group: which of a neighbour's paths matter ---- */

#if QT_NODE
/* FNV-1a of the last path component: relative and absolute paths of a file agree on it,
 * and user space checks the full path of whatever passes (agent/decode.py). */
static __always_inline u32 name_hash(const u8 *p)
{
	u32 h = 2166136261u;
	for (int i = 0; i < QT_CAP_BYTES; i++) {
		u8 c = p[i];
		if (c == 0)
			break;
		if (c == '/') {
			h = 2166136261u;
		} else {
			h ^= c;
			h *= 16777619u;
		}
	}
	return h;
}

/* 1: a file of the targets (by name); 2: a /proc entry of a traced process. */
static __always_inline int watched_path(const u8 *p)
{
	if (p[0] == '/' && p[1] == 'p' && p[2] == 'r' && p[3] == 'o' && p[4] == 'c' &&
	    p[5] == '/') {
		u32 pid = 0;
		int i, digits = 0;
		for (i = 6; i < 16; i++) {
			u8 c = p[i];
			if (c < '0' || c > '9')
				break;
			pid = pid * 10 + (c - '0');
			digits++;
		}
		if (digits && (traced_tgids.lookup(&pid) || cgroup_tgids.lookup(&pid)))
			return 2;
	}
	u32 h = name_hash(p);
	return watched_names.lookup(&h) ? 1 : 0;
}

static __always_inline int neighbour_path(u16 kind, struct qt_inflight *f)
{
	int z = 0;
	struct qt_path *sp = scratch.lookup(&z);
	if (!sp)
		return 0;
	int w = 0;
	if (bpf_probe_read_user_str(sp->b, sizeof(sp->b), (void *)f->p0) > 0)
		w = watched_path(sp->b);
	if (!w && (kind == QT_K_RENAME || kind == QT_K_RENAMEAT2) &&
	    bpf_probe_read_user_str(sp->b, sizeof(sp->b), (void *)f->p1) > 0)
		w = watched_path(sp->b);
	return w;
}
#endif

/* ---- syscall exit: build and submit the event ---- */

static __always_inline int on_exit(void *ctx, u16 exit_kind, long ret)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tgid = id >> 32, tid = (u32)id;
	struct qt_inflight *fp = inflight.lookup(&tid);
	struct qt_inflight f = {};
	u8 no_enter = 0;
	if (fp) {
		f = *fp;
		inflight.delete(&tid);
	}
	if (f.kind != exit_kind) {
		/* An enter we missed (the syscall began before tracing did). Only an accept
		 * still tells us something: the fd it returns is a connection requests arrive on.
		 */
		if (!(exit_kind == QT_K_ACCEPT || exit_kind == QT_K_ACCEPT4) || !traced(tgid))
			return 0;
		no_enter = QT_F_NO_ENTER;
		f.kind = exit_kind;
		f.ts = bpf_ktime_get_ns();
		f.fd = -1;
		f.arg0 = (u64)-1;
	}

	u16 kind = f.kind;
	s32 fd = f.fd;
	u8 fdtype = f.fdtype;
	u8 flags = 0;
	u64 key = 0;
	struct qt_fdinfo *fi = 0;
	struct qt_fdkey k = {.tgid = tgid, .fd = fd};

	int nb = 0; /* a neighbour's path operation that the node group keeps */
#if QT_NODE
	if (is_path_kind(kind) && !traced(tgid)) {
		nb = neighbour_path(kind, &f);
		if (!nb || (kind == QT_K_OPENAT && ret < 0)) {
			count(kind, QT_C_FILTERED);
			return 0;
		}
	}
#endif

	/* New fds: record what they are so later syscalls on them can be classified. */
	if ((kind == QT_K_ACCEPT || kind == QT_K_ACCEPT4 || kind == QT_K_OPENAT) && ret >= 0) {
		struct qt_fdinfo nfi = {};
		nfi.type = kind == QT_K_OPENAT ? QT_FD_FILE : QT_FD_SOCK_IN;
		nfi.node = nb != 0;
		k.fd = (s32)ret;
		fds.update(&k, &nfi);
		fd = (s32)ret;
		fdtype = nfi.type;
	} else if (kind == QT_K_CONNECT && (ret == 0 || ret == -QT_EINPROGRESS)) {
		struct qt_fdinfo nfi = {};
		nfi.type = QT_FD_SOCK_OUT;
		fds.update(&k, &nfi);
		fdtype = QT_FD_SOCK_OUT;
	}

	struct qt_thread *th = threads.lookup(&tid);
	if (th) {
		key = th->req_key;
		flags = th->flags & QT_F_INFERRED;
	}

	int start = 0, cont = 0;
	if (fdtype == QT_FD_SOCK_IN && is_fd_kind(kind)) {
		fi = fds.lookup(&k);
		if (fi && ret > 0) {
			if (is_read_kind(kind)) {
				if (fi->last_dir != 1 || fi->req_key == 0) {
					/* A read after a write (or the first read) starts a request. */
					fi->req_key = new_key();
					fi->captured = 0;
					start = 1;
				} else if (fi->captured < QT_CAP_BYTES) {
					/* Headers and body often arrive in separate reads: a capture
					 * session follows the request until it has QT_CAP_BYTES. */
					int one = 1;
					u64 *capture = config.lookup(&one);
					cont = capture && *capture;
				}
				fi->captured += ret > QT_CAP_BYTES ? QT_CAP_BYTES : (u32)ret;
				fi->last_dir = 1;
				if (!th || th->req_key != fi->req_key || (th->flags & QT_F_INFERRED))
					set_thread_key(tid, fi->req_key, 0);
				flags = 0;
			} else {
				fi->last_dir = 2;
			}
		}
		if (fi && fi->req_key)
			key = fi->req_key;
	}

	int big = start || cont || kind == QT_K_ACCEPT || kind == QT_K_ACCEPT4 ||
		  kind == QT_K_CONNECT || kind == QT_K_OPENAT || kind == QT_K_RENAME ||
		  kind == QT_K_RENAMEAT2 || kind == QT_K_UNLINK || kind == QT_K_UNLINKAT;
	struct qt_event *e = reserve(kind, big);
	if (!e)
		return 0;
	fill_task(e, id);
	e->ts_enter = f.ts;
	e->ts_exit = bpf_ktime_get_ns();
	e->req_key = key;
	e->ret = ret;
	e->arg0 = f.arg0;
	e->arg1 = f.arg1;
	e->fd = fd;
	e->kind = kind;
	e->fdtype = fdtype;
	e->flags = flags | (start ? QT_F_REQ_START : 0) | (cont ? QT_F_REQ_CONT : 0) | no_enter;

	if (big) {
		u8 *pl = (u8 *)(e + 1);
		if (start || cont) {
			u64 cap = QT_CAP_BYTES;
			if ((u64)ret < cap)
				cap = ret;
			u64 buf = first_buffer(kind, f.p0, &cap);
			if (cap > QT_CAP_BYTES)
				cap = QT_CAP_BYTES;
			if (buf && bpf_probe_read_user(pl, cap, (void *)buf) == 0)
				e->payload_len = cap;
			e->payload_kind = start ? QT_P_REQUEST : QT_P_REQUEST_CONT;
		} else if (kind == QT_K_RENAME || kind == QT_K_RENAMEAT2) {
			bpf_probe_read_user_str(pl, QT_CAP_BYTES / 2, (void *)f.p0);
			bpf_probe_read_user_str(pl + QT_CAP_BYTES / 2, QT_CAP_BYTES / 2, (void *)f.p1);
			e->payload_len = QT_CAP_BYTES;
			e->payload_kind = QT_P_PATH2;
		} else if (kind == QT_K_OPENAT || kind == QT_K_UNLINK || kind == QT_K_UNLINKAT) {
			long n = bpf_probe_read_user_str(pl, QT_CAP_BYTES, (void *)f.p0);
			e->payload_len = n > 0 ? n : 0;
			e->payload_kind = QT_P_PATH;
		} else if (f.p0) { /* accept, connect: the peer's address */
			if (bpf_probe_read_user(pl, QT_SOCKADDR_BYTES, (void *)f.p0) == 0) {
				e->payload_len = QT_SOCKADDR_BYTES;
				e->payload_kind = QT_P_SOCKADDR;
			}
		}
	}
	int out = big ? QT_OUT_BIG : 0;
#if QT_RECORDER
	struct qt_pathkey pk = {.tgid = tgid};
	u8 *pl = (u8 *)(e + 1);
	if (start && !cont) {
#if QT_QID_KERNEL
		/* The request's first read goes on in its own program (the id search would
		 * make this one too long to verify); it returns only if that cannot run. */
		request_prog.call(ctx, 0);
#endif
		start_request(e, -1);
	} else if (kind == QT_K_OPENAT && ret >= 0 && e->payload_kind == QT_P_PATH &&
		   pl[0] == '/') {
		pk.hash = path_hash(pl);
		if (paths_sent.lookup(&pk)) {
			out = QT_OUT_SMALL;
			__builtin_memcpy(pl, &pk.hash, sizeof(pk.hash));
			e->payload_len = sizeof(pk.hash);
			e->payload_kind = QT_P_PATH_HASH;
		}
	}
	if (submit(e, out) == 0 && out == QT_OUT_BIG && pk.hash) {
		u8 one8 = 1;
		paths_sent.update(&pk, &one8);
	}
#else
	submit(e, out);
#endif
	return 0;
}

/* ---- syscall tracepoints ---- */

#define QT_EXIT(name, KIND)                                                              \
	int qt_x_##name(struct tracepoint__syscalls__sys_exit_##name *args)              \
	{                                                                                \
		return on_exit(args, KIND, args->ret);                                      \
	}

#define QT_FD_SYSCALL(name, KIND, fdf, a0, a1, p0)                                       \
	int qt_e_##name(struct tracepoint__syscalls__sys_enter_##name *args)             \
	{                                                                                \
		return on_enter(KIND, (s32)args->fdf, a0, a1, (u64)(p0), 0);            \
	}                                                                                \
	QT_EXIT(name, KIND)

QT_FD_SYSCALL(accept, QT_K_ACCEPT, fd, args->fd, 0, args->upeer_sockaddr)
QT_FD_SYSCALL(accept4, QT_K_ACCEPT4, fd, args->fd, 0, args->upeer_sockaddr)
QT_FD_SYSCALL(connect, QT_K_CONNECT, fd, 0, 0, args->uservaddr)
QT_FD_SYSCALL(read, QT_K_READ, fd, 0, args->count, args->buf)
QT_FD_SYSCALL(readv, QT_K_READV, fd, 0, args->vlen, args->vec)
QT_FD_SYSCALL(recvfrom, QT_K_RECVFROM, fd, 0, args->size, args->ubuf)
QT_FD_SYSCALL(recvmsg, QT_K_RECVMSG, fd, 0, 0, args->msg)
QT_FD_SYSCALL(write, QT_K_WRITE, fd, 0, args->count, 0)
QT_FD_SYSCALL(writev, QT_K_WRITEV, fd, 0, args->vlen, 0)
QT_FD_SYSCALL(sendto, QT_K_SENDTO, fd, 0, args->len, 0)
QT_FD_SYSCALL(sendmsg, QT_K_SENDMSG, fd, 0, 0, 0)
QT_FD_SYSCALL(sendfile64, QT_K_SENDFILE64, out_fd, args->in_fd, args->count, 0)
QT_FD_SYSCALL(splice, QT_K_SPLICE, fd_out, args->fd_in, args->len, 0)
QT_FD_SYSCALL(close, QT_K_CLOSE, fd, 0, 0, 0)
QT_FD_SYSCALL(openat, QT_K_OPENAT, dfd, args->dfd, args->flags, args->filename)
QT_FD_SYSCALL(pread64, QT_K_PREAD64, fd, args->pos, args->count, 0)
QT_FD_SYSCALL(preadv, QT_K_PREADV, fd, args->pos_l, args->vlen, 0)
QT_FD_SYSCALL(pwrite64, QT_K_PWRITE64, fd, args->pos, args->count, 0)
QT_FD_SYSCALL(pwritev, QT_K_PWRITEV, fd, args->pos_l, args->vlen, 0)
QT_FD_SYSCALL(fsync, QT_K_FSYNC, fd, 0, 0, 0)
QT_FD_SYSCALL(fdatasync, QT_K_FDATASYNC, fd, 0, 0, 0)
QT_FD_SYSCALL(ftruncate, QT_K_FTRUNCATE, fd, args->length, 0, 0)
QT_FD_SYSCALL(unlinkat, QT_K_UNLINKAT, dfd, args->flag, 0, args->pathname)
QT_FD_SYSCALL(flock, QT_K_FLOCK, fd, args->cmd, 0, 0)

/* fcntl is mostly F_GETFL and friends: only record-lock commands go further. */
int qt_e_fcntl(struct tracepoint__syscalls__sys_enter_fcntl *args)
{
	u32 cmd = args->cmd;
	if (cmd != 6 && cmd != 7 && cmd != 37 && cmd != 38) /* F_SETLK[W], F_OFD_SETLK[W] */
		return 0;
	short type = -1; /* struct flock starts with l_type (UAPI) */
	bpf_probe_read_user(&type, sizeof(type), (void *)args->arg);
	return on_enter(QT_K_FCNTL, (s32)args->fd, cmd, (u64)(u16)type, 0, 0);
}
QT_EXIT(fcntl, QT_K_FCNTL)

/* The first polled fd names what is waited for (its target); usually there is one. */
static __always_inline s32 first_pollfd(const void *ufds)
{
	s32 fd = -1;
	if (bpf_probe_read_user(&fd, sizeof(fd), ufds))
		return -1;
	return fd;
}

int qt_e_poll(struct tracepoint__syscalls__sys_enter_poll *args)
{
	return on_enter(QT_K_POLL, first_pollfd(args->ufds), args->nfds, args->timeout_msecs, 0, 0);
}
QT_EXIT(poll, QT_K_POLL)

int qt_e_ppoll(struct tracepoint__syscalls__sys_enter_ppoll *args)
{
	return on_enter(QT_K_PPOLL, first_pollfd(args->ufds), args->nfds, 0, 0, 0);
}
QT_EXIT(ppoll, QT_K_PPOLL)

QT_FD_SYSCALL(epoll_wait, QT_K_EPOLL_WAIT, epfd, args->maxevents, args->timeout, 0)
QT_FD_SYSCALL(epoll_pwait, QT_K_EPOLL_PWAIT, epfd, args->maxevents, args->timeout, 0)

int qt_e_select(struct tracepoint__syscalls__sys_enter_select *args)
{
	return on_enter(QT_K_SELECT, -1, args->n, 0, 0, 0);
}
QT_EXIT(select, QT_K_SELECT)

int qt_e_pselect6(struct tracepoint__syscalls__sys_enter_pselect6 *args)
{
	return on_enter(QT_K_PSELECT6, -1, args->n, 0, 0, 0);
}
QT_EXIT(pselect6, QT_K_PSELECT6)

int qt_e_rename(struct tracepoint__syscalls__sys_enter_rename *args)
{
	return on_enter(QT_K_RENAME, -1, 0, 0, (u64)args->oldname, (u64)args->newname);
}
QT_EXIT(rename, QT_K_RENAME)

int qt_e_renameat2(struct tracepoint__syscalls__sys_enter_renameat2 *args)
{
	return on_enter(QT_K_RENAMEAT2, args->olddfd, args->flags, args->newdfd,
			(u64)args->oldname, (u64)args->newname);
}
QT_EXIT(renameat2, QT_K_RENAMEAT2)

int qt_e_unlink(struct tracepoint__syscalls__sys_enter_unlink *args)
{
	return on_enter(QT_K_UNLINK, -1, 0, 0, (u64)args->pathname, 0);
}
QT_EXIT(unlink, QT_K_UNLINK)

/* ---- task lifecycle: follow request threads, follow children, forget the dead ---- */

int qt_fork(struct tracepoint__sched__sched_process_fork *args)
{
	u32 parent = args->parent_pid, child = args->child_pid;
	struct qt_thread *t = threads.lookup(&parent);
	if (t && t->req_key)
		set_thread_key(child, t->req_key, QT_F_INFERRED);
	u32 ptgid = bpf_get_current_pid_tgid() >> 32;
	if (traced_tgids.lookup(&ptgid)) {
		u8 followed = 2;
		traced_tgids.insert(&child, &followed);
	}
	return 0;
}

int qt_exit(struct tracepoint__sched__sched_process_exit *args)
{
	u32 tid = args->pid;
	threads.delete(&tid);
	runq.delete(&tid);
	inflight.delete(&tid);
	asleep.delete(&tid);
	pfault.delete(&tid);
	mmwait.delete(&tid);
	u8 *v = traced_tgids.lookup(&tid);
	if (v && *v == 2)
		traced_tgids.delete(&tid);
	/* The whole process is gone: its pid may be reused by an unrelated process. */
	if (args->group_dead) {
		u32 tgid = bpf_get_current_pid_tgid() >> 32;
		traced_tgids.delete(&tgid);
#if QT_NODE
		cgroup_tgids.delete(&tgid);
#endif
	}
	return 0;
}

int qt_exec(struct tracepoint__sched__sched_process_exec *args)
{
	int z = 0;
	u64 *on = config.lookup(&z);
	if (!on || !*on)
		return 0;
	struct qt_event *e = control.ringbuf_reserve(sizeof(struct qt_event));
	if (!e)
		return 0; /* the agent rescans /proc periodically, so a lost exec is only late */
	__builtin_memset(e, 0, sizeof(*e));
	fill_task(e, bpf_get_current_pid_tgid());
	e->kind = QT_K_EXEC;
	e->ts_enter = e->ts_exit = bpf_ktime_get_ns();
	e->fd = -1;
	control.ringbuf_submit(e, 0);
	return 0;
}

/* ---- TCP state and retransmits (often in softirq: match by socket, not by task) ---- */

static __always_inline int tcp_event(u16 kind, u64 sk, u16 family, u16 sport, u16 dport,
				      const u8 *saddr, const u8 *daddr, const u8 *saddr6,
				      const u8 *daddr6, u64 a0, u64 a1)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tgid = id >> 32;
	u32 owner = 0;
	u32 *known = traced_socks.lookup(&sk);
	if (known) {
		owner = *known;
	} else if (traced(tgid)) {
		owner = tgid;
		traced_socks.update(&sk, &owner);
	} else if (!traced_ports.lookup(&sport)) {
		return 0;
	}
	u64 now = bpf_ktime_get_ns(), since = now;
	if (kind == QT_K_INET_SOCK_SET_STATE) {
		/* Aggregate in the kernel: a connection makes ~5 transitions per side, but two
		 * say what matters: established (duration = handshake) and closed (ret = the
		 * lifetime; the event itself is the instant of closing, which belongs to the
		 * request active then). The rest only time-stamp the phase they start. */
		u64 *t0 = sock_since.lookup(&sk);
		if (t0)
			since = *t0;
		if (a1 == QT_TCP_CLOSE) {
			traced_socks.delete(&sk);
			sock_since.delete(&sk);
		} else if (a1 == QT_TCP_ESTABLISHED) {
			sock_since.update(&sk, &now);
		} else {
			if (!t0 || a0 == QT_TCP_CLOSE || a0 == QT_TCP_LISTEN)
				sock_since.update(&sk, &now);
			count(kind, QT_C_FILTERED);
			return 0;
		}
	}

	struct qt_event *e = reserve(kind, 1);
	if (!e)
		return 0;
	fill_task(e, id);
	if (owner != tgid) { /* softirq on someone else's time: do not blame that task */
		e->tgid = owner;
		e->tid = 0;
		__builtin_memset(e->comm, 0, sizeof(e->comm));
	}
	e->ts_enter = kind == QT_K_INET_SOCK_SET_STATE && a1 == QT_TCP_ESTABLISHED ? since : now;
	e->ts_exit = now;
	e->req_key = 0;
	e->flags = 0;
	if (owner == tgid) {
		u32 tid = (u32)id;
		struct qt_thread *th = threads.lookup(&tid);
		if (th) {
			e->req_key = th->req_key;
			e->flags = th->flags & QT_F_INFERRED;
		}
	}
	e->ret = kind == QT_K_INET_SOCK_SET_STATE && a1 == QT_TCP_CLOSE ? now - since : 0;
	e->arg0 = a0;
	e->arg1 = a1;
	e->fd = -1;
	e->kind = kind;
	e->fdtype = QT_FD_UNKNOWN;
	struct qt_tuple *t = (struct qt_tuple *)(e + 1);
	t->family = family;
	t->sport = sport;
	t->dport = dport;
	t->_pad = 0;
	if (family == 2) { /* AF_INET */
		__builtin_memset(t->saddr, 0, 16);
		__builtin_memset(t->daddr, 0, 16);
		bpf_probe_read_kernel(t->saddr, 4, saddr);
		bpf_probe_read_kernel(t->daddr, 4, daddr);
	} else {
		bpf_probe_read_kernel(t->saddr, 16, saddr6);
		bpf_probe_read_kernel(t->daddr, 16, daddr6);
	}
	e->payload_len = sizeof(struct qt_tuple);
	e->payload_kind = QT_P_TUPLE;
	/* A recorder sends only what user space learns from: a connection's ESTABLISHED
	 * (our side's address, for the accept or connect that follows). */
	submit(e, kind == QT_K_INET_SOCK_SET_STATE && a1 == QT_TCP_ESTABLISHED ? QT_OUT_BIG
									      : QT_OUT_SMALL);
	return 0;
}

int qt_sockstate(struct tracepoint__sock__inet_sock_set_state *args)
{
	if (args->protocol != 6) /* IPPROTO_TCP */
		return 0;
	return tcp_event(QT_K_INET_SOCK_SET_STATE, (u64)args->skaddr, args->family, args->sport,
			 args->dport, args->saddr, args->daddr, args->saddr_v6, args->daddr_v6,
			 args->oldstate, args->newstate);
}

int qt_retransmit(struct tracepoint__tcp__tcp_retransmit_skb *args)
{
	return tcp_event(QT_K_TCP_RETRANSMIT_SKB, (u64)args->skaddr, args->family, args->sport,
			 args->dport, args->saddr, args->daddr, args->saddr_v6, args->daddr_v6,
			 args->state, 0);
}

/* ---- block I/O ----
 * Who asked: block_bio_queue runs in the submitter's context, whereas with an I/O
 * scheduler the request is issued later by a kworker. The time runs from queueing to
 * completion (usually in an interrupt), so waiting behind a neighbour's I/O counts. A bio
 * merged into another request never completes under its own sector: the map is an LRU. */

int qt_blk_queue(struct tracepoint__block__block_bio_queue *args)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tgid = id >> 32, tid = (u32)id;
	if (!traced(tgid)) {
#if QT_NODE
		/* Node group: everyone's I/O on the targets' disks (who else kept it busy). */
		u32 dev = args->dev;
		if (!watched_devs.lookup(&dev))
			return 0;
#else
		return 0;
#endif
	}
	struct qt_blkkey k = {.sector = args->sector, .dev = args->dev};
	struct qt_blkinfo b = {};
	b.ts = bpf_ktime_get_ns();
	b.tgid = tgid;
	b.tid = tid;
	b.cgroup_id = bpf_get_current_cgroup_id();
	bpf_get_current_comm(&b.comm, sizeof(b.comm));
	struct qt_thread *th = threads.lookup(&tid);
	if (th)
		b.req_key = th->req_key;
	if (blk.update(&k, &b)) {
		count(QT_K_BLOCK_RQ, QT_C_PRODUCED);
		count(QT_K_BLOCK_RQ, QT_C_LOST_MAPFULL);
	}
	return 0;
}

int qt_blk_complete(struct tracepoint__block__block_rq_complete *args)
{
	struct qt_blkkey k = {.sector = args->sector, .dev = args->dev};
	struct qt_blkinfo *bp = blk.lookup(&k);
	if (!bp)
		return 0;
	struct qt_blkinfo b = *bp;
	blk.delete(&k);
	struct qt_event *e = reserve(QT_K_BLOCK_RQ, 0);
	if (!e)
		return 0;
	e->ts_enter = b.ts;
	e->ts_exit = bpf_ktime_get_ns();
	e->cgroup_id = b.cgroup_id;
	e->req_key = b.req_key;
	e->ret = args->error;
	e->arg0 = args->sector;
	e->arg1 = ((u64)args->dev << 32) | args->nr_sector;
	e->tgid = b.tgid;
	e->tid = b.tid;
	e->fd = -1;
	e->kind = QT_K_BLOCK_RQ;
	e->fdtype = QT_FD_UNKNOWN;
	e->flags = 0;
	e->payload_len = 0;
	e->payload_kind = QT_P_NONE;
	e->record = QT_R_EVENT;
	__builtin_memcpy(e->comm, b.comm, sizeof(e->comm));
	submit(e, 0);
	return 0;
}

/* ---- CPU waits and sleeps of request threads (sched and memory groups) ----
 * Only threads serving a request (those with a request key) are followed, so the cost on
 * every context switch of the node is one or two hash lookups. */

static __always_inline void became_runnable(u32 tid, struct qt_thread *t)
{
	(void)t;
#if QT_SCHED
	if (!t->req_key)
		return;
	struct qt_runq r = {.since = bpf_ktime_get_ns(), .cgroup_id = 0};
	runq.update(&tid, &r);
#endif
}

/* A request thread goes to sleep. Inside a traced syscall that syscall's event has the
 * time; otherwise it is a page fault's I/O (memory group: a fault just before, and an
 * uninterruptible sleep) or some other sleep (sched group). */
static __always_inline void went_to_sleep(u32 tid, u64 now, long state, struct qt_thread *t)
{
	if (!t->req_key || inflight.lookup(&tid) || mmwait.lookup(&tid))
		return;
	struct qt_sleep sl = {.since = now, .tgid = t->tgid};
#if QT_MEMORY
	struct qt_pf *pf = pfault.lookup(&tid);
	if (pf && (state & 2) && now - pf->ts < QT_PF_RECENT_NS) {
		sl.kind = QT_K_PAGE_FAULT;
		sl.addr = pf->addr;
		sl.fault_ts = pf->ts;
	}
#endif
#if QT_SCHED
	if (!sl.kind)
		sl.kind = QT_K_OFFCPU;
#endif
	if (sl.kind)
		asleep.update(&tid, &sl);
}

/* Woken: the sleep ends here (what follows is a wait for a CPU, traced apart). */
static __always_inline void woke(u32 tid, const char *comm)
{
	struct qt_sleep *sp = asleep.lookup(&tid);
	if (!sp)
		return;
	struct qt_sleep sl = *sp;
	asleep.delete(&tid);
	u64 now = bpf_ktime_get_ns();
	u64 min = sl.kind == QT_K_PAGE_FAULT ? QT_PF_MIN_NS : QT_RUNQ_MIN_NS;
	if (now - sl.since < min) {
		count(sl.kind, QT_C_FILTERED);
		return;
	}
	struct qt_thread *t = threads.lookup(&tid);
	struct qt_event *e = reserve(sl.kind, 0);
	if (!e)
		return;
	e->ts_enter = sl.since;
	e->ts_exit = now;
	e->cgroup_id = 0;
	e->req_key = t ? t->req_key : 0;
	e->ret = 0;
	e->arg0 = sl.addr;
	e->arg1 = sl.fault_ts;
	e->tgid = sl.tgid;
	e->tid = tid;
	e->fd = -1;
	e->kind = sl.kind;
	e->fdtype = QT_FD_UNKNOWN;
	e->flags = t ? t->flags & QT_F_INFERRED : 0;
	e->payload_len = 0;
	e->payload_kind = QT_P_NONE;
	e->record = QT_R_EVENT;
	bpf_probe_read_kernel(e->comm, sizeof(e->comm), comm);
	submit(e, 0);
}

/* Sleeps and CPU waits are followed only for threads that served a request (they have a
 * `threads` entry): for every other wakeup on the node, one lookup is all. */
int qt_wakeup(struct tracepoint__sched__sched_wakeup *args)
{
	u32 tid = args->pid;
	struct qt_thread *t = threads.lookup(&tid);
	if (!t)
		return 0;
	woke(tid, args->comm);
	became_runnable(tid, t);
	return 0;
}

int qt_wakeup_new(struct tracepoint__sched__sched_wakeup_new *args)
{
	u32 tid = args->pid;
	struct qt_thread *t = threads.lookup(&tid);
	if (t)
		became_runnable(tid, t);
	return 0;
}

/* ---- memory group: page faults and mmap_lock ---- */

int qt_pagefault(struct tracepoint__exceptions__page_fault_user *args)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	struct qt_thread *t = threads.lookup(&tid);
	if (!t || !t->req_key)
		return 0;
	struct qt_pf pf = {.ts = bpf_ktime_get_ns(), .addr = args->address};
	pfault.update(&tid, &pf);
	return 0;
}

int qt_mm_start(struct tracepoint__mmap_lock__mmap_lock_start_locking *args)
{
	u32 tid = (u32)bpf_get_current_pid_tgid();
	struct qt_thread *t = threads.lookup(&tid);
	if (!t || !t->req_key)
		return 0;
	u64 mm = (u64)args->mm;
	u8 one = 1;
	mm_watch.update(&mm, &one);
	struct qt_mmwait w = {};
	w.ts = bpf_ktime_get_ns();
	w.mm = mm;
	w.write = args->write;
	struct qt_holder *h = mm_holder.lookup(&mm);
	if (h && !h->released)
		w.holder = *h;
	mmwait.update(&tid, &w);
	return 0;
}

int qt_mm_acquired(struct tracepoint__mmap_lock__mmap_lock_acquire_returned *args)
{
	u64 id = bpf_get_current_pid_tgid();
	u32 tid = (u32)id;
	u64 mm = (u64)args->mm, now = bpf_ktime_get_ns();
	struct qt_mmwait *wp = mmwait.lookup(&tid);
	if (!args->success) {
		if (wp) /* a trylock that failed: no wait, and no stale entry to hide sleeps */
			mmwait.delete(&tid);
		return 0;
	}
	if (wp) {
		struct qt_mmwait w = *wp;
		mmwait.delete(&tid);
		/* Whoever released the lock during the wait let us in: that is the holder we
		 * waited for. Failing that, whoever held it when the wait began. */
		struct qt_holder *r = mm_released.lookup(&mm);
		if (r && r->ts >= w.ts && r->tid != tid)
			w.holder = *r;
		if (now - w.ts < QT_MMLOCK_MIN_NS) {
			count(QT_K_MMAP_LOCK, QT_C_FILTERED);
		} else {
			struct qt_event *e = reserve(QT_K_MMAP_LOCK, 1);
			if (e) {
				fill_task(e, id);
				struct qt_thread *t = threads.lookup(&tid);
				e->ts_enter = w.ts;
				e->ts_exit = now;
				e->req_key = t ? t->req_key : 0;
				e->flags = t ? t->flags & QT_F_INFERRED : 0;
				e->ret = 0;
				e->arg0 = ((u64)w.holder.tgid << 32) | w.holder.tid;
				e->arg1 = w.write | (w.holder.write << 1);
				e->fd = -1;
				e->kind = QT_K_MMAP_LOCK;
				e->fdtype = QT_FD_UNKNOWN;
				__builtin_memcpy((u8 *)(e + 1), w.holder.comm, 16);
				e->payload_len = 16;
				e->payload_kind = QT_P_COMM;
				submit(e, QT_OUT_SMALL);
			}
		}
	}
	/* Holders of a traced process's lock, whoever they are: often a neighbour reading
	 * its /proc entries, or a sibling thread remapping memory. */
	if (mm_watch.lookup(&mm)) {
		struct qt_holder h = {};
		h.ts = now;
		h.tgid = id >> 32;
		h.tid = tid;
		h.write = args->write;
		bpf_get_current_comm(&h.comm, sizeof(h.comm));
		mm_holder.update(&mm, &h);
	}
	return 0;
}

int qt_mm_released(struct tracepoint__mmap_lock__mmap_lock_released *args)
{
	u64 mm = (u64)args->mm;
	if (!mm_watch.lookup(&mm))
		return 0;
	u64 id = bpf_get_current_pid_tgid(), now = bpf_ktime_get_ns();
	struct qt_holder *h = mm_holder.lookup(&mm);
	if (h && h->tid == (u32)id)
		h->released = now;
	struct qt_holder r = {};
	r.ts = now;
	r.tgid = id >> 32;
	r.tid = (u32)id;
	r.write = args->write;
	bpf_get_current_comm(&r.comm, sizeof(r.comm));
	mm_released.update(&mm, &r);
	return 0;
}

int qt_switch(struct tracepoint__sched__sched_switch *args)
{
	u32 prev = args->prev_pid, next = args->next_pid;
	u64 sw = bpf_ktime_get_ns();
	int z = 0;
	struct qt_slice *cur = cpu_cur.lookup(&z), *top = cpu_top.lookup(&z);
	if (cur && top) {
		u64 len = cur->since ? sw - cur->since : 0;
		if (prev && (len >= top->len || sw - top->ended > QT_TOP_STALE_NS)) {
			top->len = len;
			top->ended = sw;
			top->pid = prev;
			bpf_probe_read_kernel(top->comm, sizeof(top->comm), args->prev_comm);
		}
		cur->since = sw;
		cur->pid = next;
	}
	/* Only threads that served a request have waits to follow: every other switch on
	 * the node (most of them) costs one lookup here. Preempted while runnable: it waits
	 * from now, with no wakeup to say so. Going to sleep: any wakeup recorded while it
	 * was still running (the kernel traces those too) is void, or the next real wait
	 * would seem to start then. */
	struct qt_thread *pt = threads.lookup(&prev);
	if (pt && args->prev_state == 0) {
		became_runnable(prev, pt);
	} else if (pt) {
		runq.delete(&prev);
		went_to_sleep(prev, sw, args->prev_state, pt);
	}
#if !QT_SCHED
	return 0;
#endif
	struct qt_runq *r = runq.lookup(&next);
	if (!r)
		return 0;
	u64 now = bpf_ktime_get_ns(), since = r->since;
	runq.delete(&next);
	if (now - since < QT_RUNQ_MIN_NS) {
		count(QT_K_RUNQ, QT_C_FILTERED);
		return 0;
	}
	struct qt_thread *t = threads.lookup(&next);
	if (!t)
		return 0;
	struct qt_event *e = reserve(QT_K_RUNQ, 1);
	if (!e)
		return 0;
	e->ts_enter = since;
	e->ts_exit = now;
	e->cgroup_id = 0;
	e->req_key = t->req_key;
	e->ret = 0;
	/* Who took the CPU: the longest slice that ended during the wait, else the last. */
	u32 taker = prev;
	int use_top = top && top->ended >= since && top->pid && top->pid != next;
	if (use_top)
		taker = top->pid;
	e->arg0 = taker;
	e->arg1 = bpf_get_smp_processor_id();
	e->tgid = t->tgid;
	e->tid = next;
	e->fd = -1;
	e->kind = QT_K_RUNQ;
	e->fdtype = QT_FD_UNKNOWN;
	e->flags = t->flags & QT_F_INFERRED;
	e->record = QT_R_EVENT;
	bpf_probe_read_kernel(e->comm, sizeof(e->comm), args->next_comm);
	u8 *pl = (u8 *)(e + 1);
	if (use_top)
		bpf_probe_read_kernel(pl, 16, top->comm);
	else
		bpf_probe_read_kernel(pl, 16, args->prev_comm);
	e->payload_len = 16;
	e->payload_kind = QT_P_COMM;
	submit(e, QT_OUT_SMALL);
	return 0;
}
