/*
 * acceld tracer: which files, and which byte ranges of them, a starting container reads.
 *
 * Compiled by BCC at load time. Every kernel struct is read with bpf_probe_read_kernel
 * at an offset (OFF_* macros) that tracer/btf_offsets.py took from the running
 * kernel's BTF: no kernel header here describes this kernel's layouts.
 *
 * Files are identified by (inode number, device, mount namespace). Paths are built in
 * the kernel by walking the file's dentries up to the task's root, so they are absolute
 * inside the container (chroot/pivot_root), with symlinks and dirfds already resolved;
 * each file's path is sent once, on its first sighting, and later events carry only
 * the identity.
 */

#define MAX_DEPTH 48
#define NAME_READ 256
#define PATH_BUF 4096
#define PATH_MASK (PATH_BUF - 1)
#define MAPLE_MAX_HEIGHT 8

#define S_IFMT 0170000
#define S_IFREG 0100000
#define S_IFDIR 0040000
#define MAP_ANONYMOUS 0x20

#define KIND_EXEC 1
#define KIND_OPEN 2
#define KIND_READ 3
#define KIND_MMAP 4
#define KIND_EXIT 5 /* a watched process ended; offset holds task_struct.exit_code */

#define EV_PATH 1       /* path[] holds the file's path: components, leaf first, NUL-ended */
#define EV_DIR 2        /* the file is a directory */
#define EV_TRUNCATED 4  /* deeper than MAX_DEPTH or longer than PATH_BUF */
#define EV_DETACHED 8   /* the walk ended at a root that is not the task's */

#define SENT_PATH 1
#define SENT_OPEN 2

struct file_key {
    u64 ino;
    u32 dev;
    u32 mntns;
};

struct extent_t {
    u64 lo;
    u64 hi;
};

/* What every event carries; sent on its own when user space already has the path. */
struct event_hdr {
    u64 ts;
    u64 ino;
    u64 offset;
    u64 length;
    u32 dev;
    u32 mntns;
    u32 pid;
    u32 kind;
    u32 flags;
    u32 path_len;
};

/* First sighting of a file: the header plus its path, built in a reserved ring record. */
struct event_t {
    struct event_hdr hdr;
    char path[PATH_BUF + NAME_READ];
};

struct pending_t {
    u64 file;
    u64 offset;
    u64 length;
    u32 kind;
    u32 mntns;
};

/* Hand-off from a probe to the tail-called path walker, keyed by thread: probes can be
 * preempted on this kernel (PREEMPT_DYNAMIC), so per-CPU scratch space could be
 * overwritten by another task's probe mid-event; per-thread state cannot. */
struct walk_t {
    struct event_hdr hdr;
    u64 file;
    struct file_key key;
    u32 sent_before; /* SENT_* bits of the file before this event */
    u32 sent;        /* ... and after it has been sent */
};

BPF_RINGBUF_OUTPUT(events, RING_PAGES);
BPF_HASH(target_mntns, u32, u8, 1024);
BPF_HASH(target_cgroup, u64, u8, 1024);
BPF_HASH(target_pids, u32, u8, 65536);
BPF_HASH(watch_exit, u32, u8, 1024);
BPF_HASH(pending, u64, struct pending_t, 65536);
BPF_HASH(walk_args, u64, struct walk_t, 16384);
BPF_HASH(seen, struct file_key, u32, 262144);
BPF_HASH(extents, struct file_key, struct extent_t, 262144);
BPF_ARRAY(dropped, u64, 1);
BPF_PROG_ARRAY(path_walker, 1);

static __always_inline u64 rd64(const char *p)
{
    u64 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), p);
    return v;
}

static __always_inline u32 rd32(const char *p)
{
    u32 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), p);
    return v;
}

static __always_inline u16 rd16(const char *p)
{
    u16 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), p);
    return v;
}

static __always_inline u32 task_mntns(const char *task)
{
    const char *nsproxy = (const char *)rd64(task + OFF_TASK_NSPROXY);
    if (!nsproxy)
        return 0;
    const char *mnt_ns = (const char *)rd64(nsproxy + OFF_NSPROXY_MNT_NS);
    if (!mnt_ns)
        return 0;
    return rd32(mnt_ns + OFF_MNTNS_INUM);
}

/* Is the current task one we trace? Checked first on every probe, so it stays cheap. */
static __always_inline int traced(u32 *mntns)
{
    const char *task = (const char *)bpf_get_current_task();
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    *mntns = task_mntns(task);
    if (target_pids.lookup(&tgid))
        return 1;
    if (target_mntns.lookup(mntns))
        return 1;
    u64 cgroup = bpf_get_current_cgroup_id();
    if (target_cgroup.lookup(&cgroup))
        return 1;
    return 0;
}

static __always_inline const char *fd_file(int fd)
{
    if (fd < 0)
        return 0;
    const char *task = (const char *)bpf_get_current_task();
    const char *files = (const char *)rd64(task + OFF_TASK_FILES);
    if (!files)
        return 0;
    const char *fdt = (const char *)rd64(files + OFF_FILES_FDT);
    if (!fdt || (u32)fd >= rd32(fdt + OFF_FDT_MAX_FDS))
        return 0;
    const char *fd_array = (const char *)rd64(fdt + OFF_FDT_FD);
    return (const char *)rd64(fd_array + (u64)fd * 8);
}

static __always_inline u16 file_mode(const char *file)
{
    const char *inode = (const char *)rd64(file + OFF_FILE_F_INODE);
    return rd16(inode + OFF_INODE_I_MODE);
}

/* Writes path components leaf first into ev->path; returns the bytes written. */
static __always_inline u32 walk_path(struct event_t *ev, const char *file)
{
    const char *task = (const char *)bpf_get_current_task();
    const char *fs = (const char *)rd64(task + OFF_TASK_FS);
    const char *root_mnt = (const char *)rd64(fs + OFF_FS_ROOT + OFF_PATH_MNT);
    const char *root_dentry = (const char *)rd64(fs + OFF_FS_ROOT + OFF_PATH_DENTRY);
    const char *vfsmnt = (const char *)rd64(file + OFF_FILE_F_PATH + OFF_PATH_MNT);
    const char *dentry = (const char *)rd64(file + OFF_FILE_F_PATH + OFF_PATH_DENTRY);
    u32 off = 0;
    int done = 0;

    for (int i = 0; i < MAX_DEPTH; i++) {
        if (dentry == root_dentry && vfsmnt == root_mnt) {
            done = 1;
            break;
        }
        const char *mount = vfsmnt - OFF_MOUNT_MNT;
        if (dentry == (const char *)rd64(vfsmnt + OFF_VFSMOUNT_MNT_ROOT)) {
            const char *parent = (const char *)rd64(mount + OFF_MOUNT_MNT_PARENT);
            if (parent == mount) {
                ev->hdr.flags |= EV_DETACHED;
                done = 1;
                break;
            }
            dentry = (const char *)rd64(mount + OFF_MOUNT_MNT_MOUNTPOINT);
            vfsmnt = parent + OFF_MOUNT_MNT;
            continue;
        }
        const char *parent_dentry = (const char *)rd64(dentry + OFF_DENTRY_D_PARENT);
        if (parent_dentry == dentry) {
            ev->hdr.flags |= EV_DETACHED;
            done = 1;
            break;
        }
        if (off >= PATH_BUF)
            break;
        const char *name = (const char *)rd64(dentry + OFF_DENTRY_D_NAME_NAME);
        long n = bpf_probe_read_kernel_str(&ev->path[off & PATH_MASK], NAME_READ, name);
        if (n <= 0)
            break;
        off += n;
        dentry = parent_dentry;
    }
    if (!done || off > PATH_BUF) {
        ev->hdr.flags |= EV_TRUNCATED;
        if (off > PATH_BUF)
            off = PATH_BUF;
    }
    return off;
}

static __always_inline void start_event(struct event_hdr *ev, u32 kind, u32 mntns,
                                        const char *file, struct file_key *key)
{
    const char *inode = (const char *)rd64(file + OFF_FILE_F_INODE);
    const char *sb = (const char *)rd64(inode + OFF_INODE_I_SB);
    ev->ts = bpf_ktime_get_ns();
    ev->ino = rd64(inode + OFF_INODE_I_INO);
    ev->dev = rd32(sb + OFF_SB_S_DEV);
    ev->mntns = mntns;
    ev->pid = bpf_get_current_pid_tgid() >> 32;
    ev->kind = kind;
    ev->flags = (rd16(inode + OFF_INODE_I_MODE) & S_IFMT) == S_IFDIR ? EV_DIR : 0;
    ev->offset = 0;
    ev->length = 0;
    ev->path_len = 0;
    key->ino = ev->ino;
    key->dev = ev->dev;
    key->mntns = mntns;
}

static __always_inline void count_drop(void)
{
    u32 zero = 0;
    u64 *count = dropped.lookup(&zero);
    if (count)
        __sync_fetch_and_add(count, 1);
}

/* Tail-called by send() when the event must carry the file's path: the only program
 * with the dentry walk, so the verifier explores that loop once, not once per probe. */
int send_with_path(void *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    struct walk_t *w = walk_args.lookup(&id);
    if (!w)
        return 0;
    struct event_t *ev = events.ringbuf_reserve(sizeof(struct event_t));
    if (!ev) {
        count_drop();
        walk_args.delete(&id);
        return 0;
    }
    ev->hdr = w->hdr;
    ev->hdr.flags |= EV_PATH;
    ev->hdr.path_len = walk_path(ev, (const char *)w->file);
    events.ringbuf_submit(ev, 0);
    seen.update(&w->key, &w->sent);
    walk_args.delete(&id);
    return 0;
}

/* Sends the event, with the file's path if user space has not had it yet. */
static __always_inline void send(void *ctx, struct event_hdr *ev, const char *file,
                                 struct file_key *key, u32 sent_bit)
{
    u32 *sent = seen.lookup(key);
    u32 sent_before = sent ? *sent : 0;
    if (!(sent_before & SENT_PATH)) {
        struct walk_t w = {};
        w.hdr = *ev;
        w.file = (u64)file;
        w.key = *key;
        w.sent_before = sent_before;
        w.sent = sent_before | SENT_PATH | sent_bit;
        u64 id = bpf_get_current_pid_tgid();
        if (walk_args.update(&id, &w) == 0)
            path_walker.call(ctx, 0);
        /* Only reached if the tail call failed: send without the path and leave the
         * file unmarked, so that its next event tries again. */
        walk_args.delete(&id);
    }
    if (events.ringbuf_output(ev, sizeof(*ev), 0)) {
        count_drop();
        return;
    }
    u32 sent_after = sent_before | sent_bit;
    if (sent_after != sent_before)
        seen.update(key, &sent_after);
}

/* ---- process tree following (for "everything started from process X") ---- */

TRACEPOINT_PROBE(sched, sched_process_fork)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!target_pids.lookup(&tgid))
        return 0;
    u32 child = args->child_pid;
    u8 one = 1;
    target_pids.update(&child, &one);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if ((u32)id == tgid) {
        target_pids.delete(&tgid);
        if (watch_exit.lookup(&tgid)) {
            /* do_exit() stores the status before this tracepoint fires:
             * (code << 8) | signal, as wait(2) reports it. */
            const char *task = (const char *)bpf_get_current_task();
            struct event_hdr hdr = {};
            hdr.ts = bpf_ktime_get_ns();
            hdr.pid = tgid;
            hdr.kind = KIND_EXIT;
            hdr.offset = rd32(task + OFF_TASK_EXIT_CODE);
            events.ringbuf_output(&hdr, sizeof(hdr), 0);
            watch_exit.delete(&tgid);
        }
    }
    pending.delete(&id);
    walk_args.delete(&id);
    return 0;
}

/* ---- exec: the executable and the ELF interpreter the kernel opened for it ---- */

/* The VMA of `addr` in the task's maple tree, or 0. A wrong turn cannot produce a wrong
 * answer: the caller checks the VMA's bounds. */
static __always_inline const char *find_vma(const char *mm, u64 addr)
{
    u64 entry = rd64(mm + OFF_MM_MA_ROOT);
    for (int depth = 0; depth < MAPLE_MAX_HEIGHT; depth++) {
        /* The root pointer is tagged 2 (an internal node); child pointers carry 4 (not
         * null) and every node pointer has its type in bits 3-6. */
        if (depth == 0 && (entry & 3) != 2)
            return 0;
        if (entry < 4096)
            return 0;
        const char *node = (const char *)(entry & ~255ULL);
        u32 type = (entry >> 3) & 15;
        u32 npivots = MAPLE_RANGE64_PIVOTS;
        u32 pivot_off = OFF_MAPLE_RANGE64_PIVOT;
        u32 slot_off = OFF_MAPLE_RANGE64_SLOT;
        if (type == 3) {
            npivots = MAPLE_ARANGE64_PIVOTS;
            pivot_off = OFF_MAPLE_ARANGE64_PIVOT;
            slot_off = OFF_MAPLE_ARANGE64_SLOT;
        } else if (type != 1 && type != 2) {
            return 0;
        }
        u32 slot = npivots;
        for (u32 i = 0; i < MAPLE_RANGE64_PIVOTS; i++) {
            if (i >= npivots)
                break;
            u64 pivot = rd64(node + pivot_off + i * 8);
            if (addr <= pivot || (pivot == 0 && i > 0)) {
                slot = i;
                break;
            }
        }
        entry = rd64(node + slot_off + (slot & 15) * 8);
        if (type == 1)
            return (const char *)entry;
    }
    return 0;
}

static __always_inline void send_exec(void *ctx, u32 mntns, const char *file)
{
    struct file_key key = {};
    struct event_hdr ev;
    start_event(&ev, KIND_EXEC, mntns, file, &key);
    send(ctx, &ev, file, &key, 0);
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    u32 mntns;
    if (!traced(&mntns))
        return 0;
    const char *task = (const char *)bpf_get_current_task();
    const char *mm = (const char *)rd64(task + OFF_TASK_MM);
    const char *exe = (const char *)rd64(mm + OFF_MM_EXE_FILE);
    if (exe)
        send_exec(args, mntns, exe);
    return 0;
}

/* A program of its own (attached to the same tracepoint by trace.py) so that the
 * verifier explores the maple tree walk apart from the exe's path walk. */
int exec_interpreter(void *ctx)
{
    u32 mntns;
    if (!traced(&mntns))
        return 0;
    const char *task = (const char *)bpf_get_current_task();
    const char *mm = (const char *)rd64(task + OFF_TASK_MM);
    const char *exe = (const char *)rd64(mm + OFF_MM_EXE_FILE);
    /* The new image starts in its ELF interpreter (ld.so) when it has one. */
    const char *regs = (const char *)bpf_task_pt_regs((struct task_struct *)bpf_get_current_task_btf());
    u64 ip = rd64(regs + OFF_PT_REGS_IP);
    const char *vma = find_vma(mm, ip);
    if (!vma || ip < rd64(vma + OFF_VMA_VM_START) || ip >= rd64(vma + OFF_VMA_VM_END))
        return 0;
    const char *interp = (const char *)rd64(vma + OFF_VMA_VM_FILE);
    if (interp && interp != exe)
        send_exec(ctx, mntns, interp);
    return 0;
}

/* ---- open: read the new fd's file at syscall exit ---- */

static __always_inline int exit_open(void *ctx, long ret)
{
    u32 mntns;
    if (ret < 0 || !traced(&mntns))
        return 0;
    const char *file = fd_file((int)ret);
    if (!file)
        return 0;
    struct file_key key = {};
    struct event_hdr ev;
    start_event(&ev, KIND_OPEN, mntns, file, &key);
    u32 *sent = seen.lookup(&key);
    if (sent && (*sent & SENT_OPEN))
        return 0;
    send(ctx, &ev, file, &key, SENT_OPEN);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_openat) { return exit_open(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_openat2) { return exit_open(args, args->ret); }
#ifdef HAVE_SYS_OPEN
TRACEPOINT_PROBE(syscalls, sys_exit_open) { return exit_open(args, args->ret); }
#endif

/* ---- read, pread64, readv, preadv, sendfile, copy_file_range, splice:
 *      position at entry, byte count at exit ---- */

static __always_inline int enter_read(int fd, s64 pos)
{
    u32 mntns;
    if (!traced(&mntns))
        return 0;
    const char *file = fd_file(fd);
    if (!file || (file_mode(file) & S_IFMT) != S_IFREG)
        return 0;
    struct pending_t p = {};
    p.file = (u64)file;
    p.offset = pos >= 0 ? (u64)pos : rd64(file + OFF_FILE_F_POS);
    p.kind = KIND_READ;
    p.mntns = mntns;
    u64 id = bpf_get_current_pid_tgid();
    pending.update(&id, &p);
    return 0;
}

static __always_inline int exit_read(void *ctx, long ret)
{
    u64 id = bpf_get_current_pid_tgid();
    struct pending_t *found = pending.lookup(&id);
    if (!found)
        return 0;
    struct pending_t p = *found;
    pending.delete(&id);
    if (ret <= 0 || p.kind != KIND_READ)
        return 0;
    const char *file = (const char *)p.file;
    struct file_key key = {};
    struct event_hdr ev;
    start_event(&ev, KIND_READ, p.mntns, file, &key);
    u64 lo = p.offset, hi = p.offset + (u64)ret;
    struct extent_t *known = extents.lookup(&key);
    if (known && lo >= known->lo && hi <= known->hi)
        return 0; /* already reported */
    struct extent_t grown = {lo, hi};
    if (known && lo <= known->hi && hi >= known->lo) {
        grown.lo = lo < known->lo ? lo : known->lo;
        grown.hi = hi > known->hi ? hi : known->hi;
    }
    extents.update(&key, &grown);
    ev.offset = lo;
    ev.length = (u64)ret;
    send(ctx, &ev, file, &key, 0);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_read) { return enter_read(args->fd, -1); }
TRACEPOINT_PROBE(syscalls, sys_exit_read) { return exit_read(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_pread64) { return enter_read(args->fd, args->pos); }
TRACEPOINT_PROBE(syscalls, sys_exit_pread64) { return exit_read(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_readv) { return enter_read(args->fd, -1); }
TRACEPOINT_PROBE(syscalls, sys_exit_readv) { return exit_read(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_preadv) { return enter_read(args->fd, args->pos_l); }
TRACEPOINT_PROBE(syscalls, sys_exit_preadv) { return exit_read(args, args->ret); }

/* File-to-file/pipe copies read the source in the kernel (busybox cat uses sendfile).
 * A non-null offset pointer holds the position; otherwise the file position is used. */
static __always_inline s64 user_pos(const void *ptr)
{
    s64 pos = -1;
    if (ptr)
        bpf_probe_read_user(&pos, sizeof(pos), ptr);
    return pos;
}

TRACEPOINT_PROBE(syscalls, sys_enter_sendfile64)
{
    return enter_read(args->in_fd, user_pos(args->offset));
}
TRACEPOINT_PROBE(syscalls, sys_exit_sendfile64) { return exit_read(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_copy_file_range)
{
    return enter_read(args->fd_in, user_pos(args->off_in));
}
TRACEPOINT_PROBE(syscalls, sys_exit_copy_file_range) { return exit_read(args, args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_splice)
{
    return enter_read(args->fd_in, user_pos(args->off_in));
}
TRACEPOINT_PROBE(syscalls, sys_exit_splice) { return exit_read(args, args->ret); }

/* ---- mmap of a file: fd, offset and length at entry, success at exit ---- */

TRACEPOINT_PROBE(syscalls, sys_enter_mmap)
{
    u32 mntns;
    if ((args->flags & MAP_ANONYMOUS) || !traced(&mntns))
        return 0;
    const char *file = fd_file((int)args->fd);
    if (!file || (file_mode(file) & S_IFMT) != S_IFREG)
        return 0;
    struct pending_t p = {};
    p.file = (u64)file;
    p.offset = args->off;
    p.length = args->len;
    p.kind = KIND_MMAP;
    p.mntns = mntns;
    u64 id = bpf_get_current_pid_tgid();
    pending.update(&id, &p);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_mmap)
{
    u64 id = bpf_get_current_pid_tgid();
    struct pending_t *found = pending.lookup(&id);
    if (!found)
        return 0;
    struct pending_t p = *found;
    pending.delete(&id);
    /* mmap returns an address, or -errno in the last page of the address space. */
    if (p.kind != KIND_MMAP || (unsigned long)args->ret >= (unsigned long)-4095)
        return 0;
    const char *file = (const char *)p.file;
    struct file_key key = {};
    struct event_hdr ev;
    start_event(&ev, KIND_MMAP, p.mntns, file, &key);
    ev.offset = p.offset;
    ev.length = p.length;
    send(args, &ev, file, &key, 0);
    return 0;
}
