# The dispatch kernel's source, compiled twice: v2grt/_core.pyx (baseline x86-64 / any CPU) and
# v2grt/_core_avx2.pyx (AVX2). v2grt.kernel imports the best one the CPU runs. Edit here, not there.

from libc.math cimport INFINITY, isinf

from v2grt.codes import Reason
from v2grt._buffers import (
    CHUNK_ROWS,
    MAX_CHUNKS,
    MIN_SETPOINT_KW,
    T_ALLOCATED,
    T_AVAIL_CHG,
    T_AVAIL_DIS,
    T_FEASIBLE_CHG,
    T_FEASIBLE_DIS,
    T_N_CARRYING,
    T_REQUEST,
    T_TARGET,
)

BACKEND = "cython"

cdef extern from *:
    """
    #ifndef V2GRT_KERNEL_DIGEST
    #define V2GRT_KERNEL_DIGEST "unknown"
    #endif
    """
    const char* V2GRT_KERNEL_DIGEST

#: sha256 (16 hex digits) of _kernel.pxi as built (setup.py): the same in every build of one install.
SOURCE_DIGEST = V2GRT_KERNEL_DIGEST.decode("ascii")

ctypedef unsigned char u8
ctypedef unsigned short u16
ctypedef long long i64

# Reason codes (v2grt.codes.Reason) and totals indices (v2grt._buffers) as C constants for the nogil
# body; checked against the Python definitions at import.
cdef enum:
    R_OK = 0
    R_EMPTY = 1
    R_OFFLINE = 2
    R_TIMEOUT = 3
    R_SOH = 4
    R_THERMAL = 5
    R_SOC_MIN = 9
    R_ESTOP = 10
    R_INVALID = 11
    R_SOC_MAX = 12

cdef enum:
    T_REQUEST_I = 0
    T_TARGET_I = 1
    T_ALLOCATED_I = 2
    T_FEASIBLE_DIS_I = 3
    T_FEASIBLE_CHG_I = 4
    T_AVAIL_DIS_I = 5
    T_AVAIL_CHG_I = 6
    T_N_CARRYING_I = 7


# Windows and takes at or below this (kW) are no power (v2grt._buffers.MIN_SETPOINT_KW): zero, as in the twin.
cdef double MIN_TAKE_KW = 1e-6


cdef struct Pin:
    Py_ssize_t row  # the pinned row, or -1
    double kw  # what it was asked for (+ discharge)
    bint ok  # the row participates this cycle (so the pin applies)
    Py_ssize_t site  # its site (pass 1 fills ok and site)


cdef struct Params:
    double minimum_soc, maximum_soc, soc_taper, soh_threshold
    double temp_min_c, temp_max_c, temp_derate_c
    double per_endurance  # 3600 / endurance_s: kWh above the floor -> kW sustainable for endurance_s
    double node_ramp_kw, fleet_ramp_kw
    double hysteresis, w_soc, w_cycles, w_soh, w_temp
    double inv_cycles_ref, inv_soc_taper, inv_temp_derate_c  # reciprocals: a multiply is ~5x cheaper than a divide
    double q_scale
    int buckets
    bint prorata


cdef double _ramp(double rate_kw_per_s, double dt_s) noexcept nogil:
    if isinf(rate_kw_per_s):
        return INFINITY
    if rate_kw_per_s == 0.0:  # not 0 * inf = NaN for an unbounded dt
        return 0.0
    return rate_kw_per_s * _max(dt_s, 0.0)


cdef inline double _min(double a, double b) noexcept nogil:
    return a if a < b else b


cdef inline double _max(double a, double b) noexcept nogil:
    return a if a > b else b


cdef inline float _minf(float a, float b) noexcept nogil:
    return a if a < b else b


cdef inline float _maxf(float a, float b) noexcept nogil:
    return a if a > b else b


cdef inline float _taperf(float x, float inv_band) noexcept nogil:
    """0 at x <= 0, rising linearly to 1 at x >= band (a step at 0 when band is 0, inv_band 0).
    Selects, not branches, so loops that call it still vectorise. float32, as the block arithmetic."""
    cdef float zero = 0.0, one = 1.0
    cdef float y = x * inv_band
    y = zero if y < zero else y
    y = one if y > one else y
    cdef float step = one if x > zero else zero
    return y if inv_band > zero else step


cdef inline bint _validf(float soc, float soh, float capacity_kwh, float p_dis_max_kw, float p_chg_max_kw,
                         float temp_c, float efficiency, float cycle_count) noexcept nogil:
    """Every value finite and in range. One sum tests finiteness for all eight (NaN or inf anywhere
    makes s - s NaN, and a sum that overflows float32 is as unusable), then min/max fold the range tests
    instead of sixteen separate comparisons (v2grt bench kernel, 1M nodes: ~15.3 -> ~14.6 ms). In
    float32, as the columns are, and so in the twin."""
    cdef float zero = 0.0, one = 1.0
    cdef float s = soc + soh + capacity_kwh + p_dis_max_kw + p_chg_max_kw + temp_c + efficiency + cycle_count
    return ((s - s == zero) & (_minf(soc, soh) >= zero) & (_maxf(soc, soh) <= one) & (capacity_kwh > zero)
            & (_minf(_minf(p_dis_max_kw, p_chg_max_kw), cycle_count) >= zero)
            & (efficiency > zero) & (efficiency <= one))


cdef inline Py_ssize_t _imin(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return a if a < b else b


def dispatch(fleet, profile, double request_kw, i64 now_ns, double dt_s, bint estop, out, work,
             Py_ssize_t pin_row=-1, double pin_kw=0.0):
    """Turn a fleet request into one setpoint per node for this cycle.

    Parameters
    ----------
    fleet : Fleet
        The fleet table; rows ``[0, fleet.n_rows)`` and sites ``[0, fleet.n_sites)`` are read.
        Nothing in it is modified.
    profile : DispatchProfile
        Battery limits, ranking weights and policy.
    request_kw : float
        kW asked of the fleet (base schedule + service response); + discharge into the grid.
    now_ns : int
        CLOCK_MONOTONIC ns of this cycle: a row whose ``fleet.telemetry_tick`` is below
        ``fleet.stale_tick(now_ns, profile.stale_after_s)`` is stale (its telemetry is more than
        stale_after_s old, in whole ticks of 1 ms).
    dt_s : float
        Seconds since the previous cycle, for ramp limits.
    estop : bool
        Emergency stop: every node to 0 kW with reason EMERGENCY_STOP.
    out : KernelOutput
        Caller-owned outputs (capacity >= n_rows): ``setpoint_kw`` (+ discharge), ``avail_dis_kw``,
        ``avail_chg_kw`` (magnitudes), ``reason`` (uint8 Reason), ``totals`` (T_* indices) and
        ``reason_counts`` (rows per reason code).
    work : Workspace
        Caller-owned scratch space. ``work.threads`` = 2 runs pass 1 and the merit fill in chunks on
        this thread and one worker thread (started from this thread; docs/architecture.md, "The kernel
        on two threads") where that is safe and pays; ``work.kernel_mode()`` says what the call did.
    pin_row, pin_kw : int, float
        One node held at pin_kw this cycle (a test discharge), outside the ranking; -1: none.

    Notes
    -----
    Equals v2grt.reference.dispatch (see its notes for the rules); totals and the marginal node may
    differ by float rounding because sums are taken in another order. One thread or two give the
    same bytes: the chunks and the order their sums are merged in do not depend on the thread count.
    """
    cdef Py_ssize_t n = fleet.n_rows
    cdef Py_ssize_t n_sites = fleet.n_sites
    if out.capacity < n or not work.fits(n, n_sites):
        raise ValueError(f"kernel buffers too small: fleet has {n} rows and {n_sites} sites, outputs hold "
                         f"{out.capacity} rows, workspace {work.capacity} rows / {work.site_capacity} sites")
    cdef Params p
    p.minimum_soc = profile.minimum_soc
    p.maximum_soc = profile.maximum_soc
    p.soc_taper = profile.soc_taper
    p.soh_threshold = profile.soh_threshold
    p.temp_min_c = profile.temp_min_c
    p.temp_max_c = profile.temp_max_c
    p.temp_derate_c = profile.temp_derate_c
    p.per_endurance = 3600.0 / profile.endurance_s
    p.node_ramp_kw = _ramp(profile.node_ramp_kw_per_s, dt_s)
    p.fleet_ramp_kw = _ramp(profile.fleet_ramp_kw_per_s, dt_s)
    p.hysteresis = profile.hysteresis
    p.w_soc = profile.w_soc
    p.w_cycles = profile.w_cycles
    p.w_soh = profile.w_soh
    p.w_temp = profile.w_temp
    p.inv_cycles_ref = 1.0 / profile.cycles_ref
    p.inv_soc_taper = 1.0 / p.soc_taper if p.soc_taper > 0.0 else 0.0
    p.inv_temp_derate_c = 1.0 / p.temp_derate_c if p.temp_derate_c > 0.0 else 0.0
    p.buckets = work.buckets
    p.q_scale = (p.buckets - 1) / (1.0 + p.hysteresis)
    p.prorata = profile.policy == "prorata"

    cdef const u8[::1] active = fleet.active
    cdef const u8[::1] online = fleet.online
    cdef const u8[::1] fault = fleet.fault
    cdef const int[::1] site = fleet.site
    cdef const float[::1] soc = fleet.soc
    cdef const float[::1] soh = fleet.soh
    cdef const float[::1] capacity_kwh = fleet.capacity_kwh
    cdef const float[::1] p_dis_max_kw = fleet.p_dis_max_kw
    cdef const float[::1] p_chg_max_kw = fleet.p_chg_max_kw
    cdef const float[::1] temp_c = fleet.temp_c
    cdef const float[::1] cycle_count = fleet.cycle_count
    cdef const float[::1] efficiency = fleet.efficiency
    # Telemetry times as the kernel reads them: int32 ticks, 4 bytes a row instead of the exact int64 ns.
    cdef const int[::1] telemetry_tick = fleet.telemetry_tick
    cdef int stale_before = fleet.stale_tick(now_ns, profile.stale_after_s)
    cdef const float[::1] last_kw = fleet.last_setpoint_kw
    cdef const double[::1] site_export_kw = fleet.site_export_kw
    cdef const double[::1] site_import_kw = fleet.site_import_kw
    cdef const u8[::1] site_fault = fleet.site_fault

    cdef double[::1] setpoint_out = out.setpoint_kw
    cdef float[::1] avail_dis_out = out.avail_dis_kw
    cdef float[::1] avail_chg_out = out.avail_chg_kw
    cdef u8[::1] reason_out = out.reason
    cdef double[::1] totals_out = out.totals
    cdef i64[::1] reason_counts = out.reason_counts
    if reason_counts.shape[0] < 256:
        raise ValueError(f"out.reason_counts holds {reason_counts.shape[0]} slots, a uint8 reason needs 256")

    cdef float[::1] window = work.window_kw
    cdef u16[::1] q = work.q
    cdef int[::1] order = work.order
    cdef double[::1] site_hi = work.site_hi_kw
    cdef double[::1] site_lo = work.site_lo_kw
    cdef double[::1] site_rem = work.site_rem_kw
    cdef double[::1] hist = work.hist_kw
    cdef i64[::1] count = work.count

    cdef double sums[4]
    cdef int direction
    cdef Pin pin
    pin.row, pin.kw, pin.ok, pin.site = (pin_row if 0 <= pin_row < n else -1), pin_kw, False, -1

    # The chunks (the same for any thread count) and who runs them.
    cdef Py_ssize_t[::1] bounds = work.chunk_bounds
    cdef double[::1] chunk_hist = work.chunk_hist_kw
    cdef i64[::1] chunk_counts = work.chunk_counts
    cdef double[::1] chunk_sums = work.chunk_sums_kw
    cdef i64[::1] carrying = work.chunk_carrying
    cdef i64[::1] stats = work.kernel_stats
    cdef Py_ssize_t max_chunks = bounds.shape[0] - 1, c, k
    cdef Py_ssize_t n_chunks, chunk_rows = work.chunk_rows
    with nogil:
        n_chunks = _plan(n, &site[0], chunk_rows, max_chunks, &bounds[0])
    cdef Runner run
    run.team, run.n_chunks, run.mine, run.rounds = NULL, n_chunks, 0, 0
    cdef Team team
    cdef int rc = 0
    cdef int contiguous = -1  # -1: not checked (one thread was going to run anyway)
    if work.threads >= 2 and n_chunks >= 2 and n >= work.parallel_min_rows:
        contiguous = _contiguity(fleet, work, n, n_sites, site)
        if contiguous:
            team = work.teams.get(ISA)
            if team is None:
                team = work.teams[ISA] = Team()
            with nogil:
                rc = v2grt_team_ensure(team.t)
            if rc == 0:
                run.team = team.t
            else:  # reported in kernel_stats: -3 one CPU allowed, -2 the worker could not be started
                contiguous = -3 if rc == -1 else -2
    cdef Pass1 a
    a.p = &p
    a.n_sites, a.pin_row, a.buckets = n_sites, pin.row, p.buckets
    a.stale_before, a.direction, a.estop = stale_before, 0, estop
    a.active, a.online, a.fault, a.site, a.site_fault = &active[0], &online[0], &fault[0], &site[0], &site_fault[0]
    a.tel = &telemetry_tick[0]
    a.soc, a.soh, a.capacity_kwh = &soc[0], &soh[0], &capacity_kwh[0]
    a.p_dis_max_kw, a.p_chg_max_kw, a.temp_c = &p_dis_max_kw[0], &p_chg_max_kw[0], &temp_c[0]
    a.cycle_count, a.efficiency, a.last_kw = &cycle_count[0], &efficiency[0], &last_kw[0]
    a.reason, a.dis, a.chg = &reason_out[0], &avail_dis_out[0], &avail_chg_out[0]
    a.window, a.q = &window[0], &q[0]
    a.site_hi, a.site_lo = &site_hi[0], &site_lo[0]
    a.hist, a.chunk_hist = &hist[0], &chunk_hist[0]
    a.counts, a.chunk_counts = &reason_counts[0], &chunk_counts[0]
    a.chunk_sums = &chunk_sums[0]
    a.bounds = &bounds[0]
    a.pin = &pin
    with nogil:
        direction = _direction(n, &p, request_kw, estop, last_kw, &sums[0])
        a.direction = direction
        for k in range(n_sites):
            site_hi[k] = 0.0
            site_lo[k] = 0.0
        _run_chunks(&run, <v2grt_chunk_fn>_pass1_chunk, &a)
        # Merged in chunk order, whoever ran which chunk: the same sums for any thread count.
        sums[1] = 0.0
        sums[2] = 0.0
        for c in range(n_chunks):
            sums[1] += chunk_sums[2 * c]
            sums[2] += chunk_sums[2 * c + 1]
        for c in range(1, n_chunks):
            _add_into(&hist[0], &chunk_hist[(c - 1) * p.buckets], p.buckets)
            for k in range(256):
                reason_counts[k] += chunk_counts[(c - 1) * 256 + k]
        _allocate(n, n_sites, &p, request_kw, direction, site, site_export_kw, site_import_kw, window, q,
                  site_hi, site_lo, site_rem, hist, count, order, avail_dis_out, avail_chg_out, &pin,
                  setpoint_out, totals_out, sums, &run, &bounds[0], &carrying[0])
    stats[0] = 2 if run.team != NULL else 1
    stats[1] = n_chunks
    stats[2] = run.rounds * n_chunks - run.mine  # chunks the worker ran
    stats[3] = contiguous


cdef int _contiguity(fleet, work, Py_ssize_t n, Py_ssize_t n_sites, const int[::1] site):
    """Whether each site's rows are one run (then two threads never add into one site's sums), cached
    in the workspace per fleet.version: Fleet.add and Fleet.remove bump it, and nothing else writes
    fleet.site after a fleet is built (code that does must bump fleet.version too)."""
    key = (id(fleet), fleet.version, n, n_sites, id(fleet.site))
    if work.sites_key == key:
        return work.sites_contiguous
    cdef u8[::1] seen = work.site_seen
    cdef bint ok
    with nogil:
        ok = _sites_contiguous(n, n_sites, &site[0], &seen[0])
    work.sites_key, work.sites_contiguous = key, int(ok)
    return ok


cdef void _add_into(double* acc, const double* x, Py_ssize_t m) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(m):
        acc[j] += x[j]


cdef int _direction(Py_ssize_t n, const Params* p, double request_kw, bint estop,
                    const float[::1] last_kw, double* prev_total_kw) noexcept nogil:
    """Sign of this cycle's target: +1 discharge, -1 charge, 0 none. Clamping to what the fleet can
    give never flips the sign, so it is known before availability, and only one direction is ranked.
    Sets *prev_total_kw to the last cycle's fleet total when a fleet ramp limit needs it (else 0)."""
    cdef double limited = request_kw, prev_total = 0.0
    cdef Py_ssize_t i
    prev_total_kw[0] = 0.0
    if estop or not (request_kw - request_kw == 0.0):  # e-stop, NaN or inf request
        return 0
    if not isinf(p.fleet_ramp_kw):
        for i in range(n):
            prev_total += last_kw[i]
        prev_total_kw[0] = prev_total
        limited = _min(_max(request_kw, prev_total - p.fleet_ramp_kw), prev_total + p.fleet_ramp_kw)
    return 1 if limited > 0.0 else (-1 if limited < 0.0 else 0)


# restrict-qualified pointers for the block arithmetic: the columns never alias the block scratch, and
# saying so is what lets the C compiler vectorise it (with memoryviews it cannot prove that for ~15 streams).
cdef extern from *:
    """
    typedef double const *__restrict__ v2grt_in_f64;
    typedef double *__restrict__ v2grt_out_f64;
    typedef float const *__restrict__ v2grt_in_f32;
    typedef float *__restrict__ v2grt_out_f32;
    typedef unsigned short const *__restrict__ v2grt_in_u16;
    typedef unsigned short *__restrict__ v2grt_out_u16;
    typedef unsigned char const *__restrict__ v2grt_in_u8;
    typedef unsigned char *__restrict__ v2grt_out_u8;
    typedef int const *__restrict__ v2grt_in_i32;
    typedef int *__restrict__ v2grt_out_i32;
    """
    ctypedef const double* in_f64 "v2grt_in_f64"
    ctypedef double* out_f64 "v2grt_out_f64"
    ctypedef const float* in_f32 "v2grt_in_f32"
    ctypedef float* out_f32 "v2grt_out_f32"
    ctypedef const u16* in_u16 "v2grt_in_u16"
    ctypedef u16* out_u16 "v2grt_out_u16"
    ctypedef const u8* in_u8 "v2grt_in_u8"
    ctypedef u8* out_u8 "v2grt_out_u8"
    ctypedef const int* in_i32 "v2grt_in_i32"
    ctypedef int* out_i32 "v2grt_out_i32"

cdef enum:
    BLOCK = 128  # rows per block: its columns, outputs and scratch (~20 KiB) stay in L1 beside the histogram


# ------------------------------------------------------------------------- two threads (kernel.threads)
# Pass 1 and the merit fill run over chunks of rows that the control thread and one persistent worker
# thread claim from an atomic counter: whoever is free takes the next chunk, so a worker that is late
# (preempted, its CPU busy, asleep in a deep C-state) costs at most the chunk it has already claimed.
# The chunks are the same whatever the thread count (they depend on the rows and their sites only), and
# every sum is per chunk, merged in chunk order after: threads 1 and 2 give the same bytes.
cdef extern from *:
    """
    #ifndef _GNU_SOURCE
    #define _GNU_SOURCE
    #endif
    #include <pthread.h>
    #include <sched.h>
    #include <linux/futex.h>
    #include <sys/syscall.h>
    #include <unistd.h>
    #include <stdint.h>
    #include <time.h>

    /* How long the control thread spins for the worker's last chunk before it sleeps on a futex: about
       a chunk at 1M rows (a futex wake-up costs ~50 us on this VM, a spin nothing but this CPU). */
    #define V2GRT_SPIN_NS 300000L
    #if defined(__x86_64__) || defined(__i386__)
    #define V2GRT_CPU_RELAX() __builtin_ia32_pause()
    #elif defined(__aarch64__)
    #define V2GRT_CPU_RELAX() __asm__ __volatile__("yield" ::: "memory")
    #else
    #define V2GRT_CPU_RELAX() __asm__ __volatile__("" ::: "memory")
    #endif

    typedef void (*v2grt_chunk_fn)(void *args, Py_ssize_t chunk);

    typedef struct {
        /* written by the control thread before it publishes a round, read by the worker after a claim */
        v2grt_chunk_fn fn;
        void *args;
        pthread_t thread;
        pthread_t owner;  /* the thread that created the worker: it inherited that one's policy and CPUs */
        int started;
        int checked;  /* owner is set */
        int one_cpu;  /* the owner may run on one CPU only: no worker */
        pid_t pid;  /* the process the worker runs in (a forked child has none) */
        char pad0[64];
        uint64_t claim;  /* n_chunks << 32 | the next chunk index: one fetch-and-add claims a chunk */
        char pad1[64];
        int32_t done;  /* chunks finished this round: the futex word the control thread may sleep on */
        int32_t waiting;  /* the control thread is (about to be) asleep on done */
        char pad2[64];
        int32_t round;  /* the futex word the worker sleeps on: bumped to start a round */
        int32_t stop;
    } v2grt_team;

    static long v2grt_futex(int32_t *addr, int op, int32_t val) {
        return syscall(SYS_futex, addr, op, val, NULL, NULL, 0);
    }

    /* Claim and run chunks until none is left; returns how many this thread ran. */
    static Py_ssize_t v2grt_team_work(v2grt_team *t) {
        Py_ssize_t ran = 0;
        for (;;) {
            uint64_t c = __atomic_fetch_add(&t->claim, 1, __ATOMIC_ACQ_REL);
            uint32_t idx = (uint32_t)c, n = (uint32_t)(c >> 32);
            if (idx >= n) return ran;
            t->fn(t->args, (Py_ssize_t)idx);
            ran++;
            __atomic_fetch_add(&t->done, 1, __ATOMIC_SEQ_CST);
            if (__atomic_load_n(&t->waiting, __ATOMIC_SEQ_CST))
                v2grt_futex(&t->done, FUTEX_WAKE_PRIVATE, 1);
        }
    }

    static void *v2grt_worker_main(void *arg) {
        v2grt_team *t = (v2grt_team *)arg;
        int32_t seen = 0, r;
        for (;;) {
            while ((r = __atomic_load_n(&t->round, __ATOMIC_ACQUIRE)) == seen)
                v2grt_futex(&t->round, FUTEX_WAIT_PRIVATE, seen);
            seen = r;
            if (__atomic_load_n(&t->stop, __ATOMIC_ACQUIRE)) return NULL;
            v2grt_team_work(t);
        }
    }

    static void v2grt_team_stop(v2grt_team *t) {
        if (!t->started) return;
        if (t->pid != getpid()) {  /* a forked child: the worker was its parent's, there is none to join */
            t->started = 0;
            t->checked = 0;
            return;
        }
        __atomic_store_n(&t->stop, 1, __ATOMIC_RELEASE);
        __atomic_fetch_add(&t->round, 1, __ATOMIC_RELEASE);
        v2grt_futex(&t->round, FUTEX_WAKE_PRIVATE, 1);
        pthread_join(t->thread, NULL);
        t->started = 0;
        t->stop = 0;
    }

    /* The worker, started from (and so with the scheduling policy, priority and CPUs of) the calling
       thread; restarted when another thread calls. 0 on success, else the pthread_create error. */
    static int v2grt_team_ensure(v2grt_team *t) {
        pthread_t self = pthread_self();
        cpu_set_t cpus;
        if ((t->started || t->one_cpu) && t->checked && pthread_equal(t->owner, self) && t->pid == getpid())
            return t->started ? 0 : -1;
        v2grt_team_stop(t);
        t->owner = self;
        t->checked = 1;
        t->pid = getpid();
        /* A caller allowed on one CPU only (realtime.cpu_affinity: [N]) would share it with its worker:
           no gain, a context switch to lose. One thread then, reported. */
        t->one_cpu = pthread_getaffinity_np(self, sizeof(cpus), &cpus) == 0 && CPU_COUNT(&cpus) < 2;
        if (t->one_cpu) return -1;
        int rc = pthread_create(&t->thread, NULL, v2grt_worker_main, t);
        if (rc) return rc;
        pthread_setname_np(t->thread, "v2grt-kernel");  /* what ps, top and the tests see */
        t->started = 1;
        return 0;
    }

    /* One round: fn(args, c) for every c in [0, n), by this thread and the worker, whoever is free;
       returns once every chunk has run. Returns the chunks this (the calling) thread ran. */
    static Py_ssize_t v2grt_team_run(v2grt_team *t, v2grt_chunk_fn fn, void *args, uint32_t n) {
        Py_ssize_t mine;
        int32_t d;
        long spins;
        struct timespec t0, t1;
        t->fn = fn;
        t->args = args;
        __atomic_store_n(&t->done, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&t->waiting, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&t->claim, (uint64_t)n << 32, __ATOMIC_RELEASE);
        __atomic_fetch_add(&t->round, 1, __ATOMIC_RELEASE);
        v2grt_futex(&t->round, FUTEX_WAKE_PRIVATE, 1);
        mine = v2grt_team_work(t);
        /* Only chunks the worker has claimed are left: spin a little (a chunk is ~0.1-0.5 ms), then sleep. */
        clock_gettime(CLOCK_MONOTONIC, &t0);
        for (spins = 1; ; spins++) {
            if (__atomic_load_n(&t->done, __ATOMIC_ACQUIRE) == (int32_t)n) return mine;
            V2GRT_CPU_RELAX();
            if ((spins & 63) == 0) {
                clock_gettime(CLOCK_MONOTONIC, &t1);
                if ((t1.tv_sec - t0.tv_sec) * 1000000000L + (t1.tv_nsec - t0.tv_nsec) > V2GRT_SPIN_NS) break;
            }
        }
        __atomic_store_n(&t->waiting, 1, __ATOMIC_SEQ_CST);
        while ((d = __atomic_load_n(&t->done, __ATOMIC_SEQ_CST)) != (int32_t)n)
            v2grt_futex(&t->done, FUTEX_WAIT_PRIVATE, d);
        return mine;
    }
    """
    ctypedef void (*v2grt_chunk_fn)(void*, Py_ssize_t) noexcept nogil
    ctypedef struct v2grt_team:
        pass
    int v2grt_team_ensure(v2grt_team* t) nogil
    void v2grt_team_stop(v2grt_team* t) nogil
    Py_ssize_t v2grt_team_run(v2grt_team* t, v2grt_chunk_fn fn, void* args, unsigned int n) nogil

from libc.stdlib cimport calloc, free


cdef class Team:
    """The kernel's worker thread (kernel.threads: 2), one per Workspace and build; a C thread that never
    takes the GIL. Started by the first dispatch that uses it, from the calling thread, whose scheduling
    policy, priority and CPU affinity it inherits; started again if another thread calls. Stopped and
    joined when the Team is collected."""

    cdef v2grt_team* t

    def __cinit__(self):
        self.t = <v2grt_team*>calloc(1, sizeof(v2grt_team))
        if self.t == NULL:
            raise MemoryError("kernel worker thread state")

    def __dealloc__(self):
        if self.t != NULL:
            with nogil:
                v2grt_team_stop(self.t)
            free(self.t)
            self.t = NULL

    def stop(self):
        """Stop and join the worker (it starts again when next needed)."""
        with nogil:
            v2grt_team_stop(self.t)


cdef Py_ssize_t _plan(Py_ssize_t n, const int* site, Py_ssize_t chunk_rows, Py_ssize_t max_chunks,
                      Py_ssize_t* bounds) noexcept nogil:
    """Row bounds of the chunks: about n / chunk_rows of them (at most max_chunks, at least 1), each
    starting where the site changes from the row before, so that a site's run of rows is never split
    (the per-site sums then equal the single-chunk kernel's). Returns the number of chunks."""
    cdef Py_ssize_t k = (n + chunk_rows - 1) // chunk_rows if chunk_rows > 0 else 1
    cdef Py_ssize_t c = 1, j, b
    k = 1 if k < 1 else (max_chunks if k > max_chunks else k)
    bounds[0] = 0
    for j in range(1, k):
        b = j * n // k
        if b <= bounds[c - 1]:
            b = bounds[c - 1] + 1
        while b < n and site[b] == site[b - 1]:
            b += 1
        if b >= n:
            break
        bounds[c] = b
        c += 1
    bounds[c] = n
    return c


cdef bint _sites_contiguous(Py_ssize_t n, Py_ssize_t n_sites, const int* site, u8* seen) noexcept nogil:
    """Whether every site's rows (inactive ones too: the kernel's runs count them) form one run; seen:
    n_sites bytes of scratch. O(n), run once per fleet.version by the caller."""
    cdef Py_ssize_t i, s
    for s in range(n_sites):
        seen[s] = 0
    for i in range(n):
        s = site[i]
        if i > 0 and s == site[i - 1]:
            continue
        if 0 <= s < n_sites:
            if seen[s]:
                return False
            seen[s] = 1
    return True


cdef struct Fill:
    const float* window
    const u16* q
    double* setpoint
    const Py_ssize_t* bounds
    i64* carrying  # per chunk
    int b_marginal
    double sign


cdef void _fill_chunk(void* args, Py_ssize_t c) noexcept nogil:
    """_fill_above on chunk c's rows (the rows it set, into carrying[c])."""
    cdef Fill* f = <Fill*>args
    cdef Py_ssize_t a = f.bounds[c], b = f.bounds[c + 1]
    f.carrying[c] = _fill_above(b - a, &f.window[a], &f.q[a], f.b_marginal, f.sign, &f.setpoint[a])


cdef void _zero_chunk(void* args, Py_ssize_t c) noexcept nogil:
    """setpoint = 0 on chunk c's rows."""
    cdef Fill* f = <Fill*>args
    cdef Py_ssize_t i
    for i in range(f.bounds[c], f.bounds[c + 1]):
        f.setpoint[i] = 0.0


cdef struct Runner:
    # How _allocate runs a chunked loop: on this thread alone, or with the worker.
    v2grt_team* team  # NULL: this thread alone
    Py_ssize_t n_chunks
    Py_ssize_t mine  # chunks the control thread ran
    Py_ssize_t rounds  # chunked loops run (each n_chunks chunks)


cdef void _run_chunks(Runner* run, v2grt_chunk_fn fn, void* args) noexcept nogil:
    cdef Py_ssize_t c
    run.rounds += 1
    if run.team != NULL:
        run.mine += v2grt_team_run(run.team, fn, args, <unsigned int>run.n_chunks)
    else:
        for c in range(run.n_chunks):
            fn(args, c)
        run.mine += run.n_chunks


cdef enum:
    # store_setpoints splits a copy of at least COPY_CHUNKS x COPY_CHUNK_MIN_ROWS rows into COPY_CHUNKS equal
    # chunks (it has no sites to respect), else copies on this thread: the kernel's MAX_CHUNKS and CHUNK_ROWS
    COPY_CHUNKS = 32
    COPY_CHUNK_MIN_ROWS = 8192


def store_setpoints(out, float[::1] last_kw_out, Py_ssize_t n, work):
    """``last_kw_out[:n] = out.setpoint_kw[:n]`` as float32: the Dispatcher's feedback of a cycle's setpoints
    into ``fleet.last_setpoint_kw`` (np.copyto's result, bit for bit), on this thread and the kernel's worker
    thread when the last dispatch with ``work`` ran two (1M rows: ~0.5 ms on one thread)."""
    cdef const double[::1] setpoint = out.setpoint_kw
    if setpoint.shape[0] < n or last_kw_out.shape[0] < n or n < 0:
        raise ValueError(f"store_setpoints: {n} rows, setpoints hold {setpoint.shape[0]}, last_kw_out "
                         f"{last_kw_out.shape[0]}")
    cdef Copy cp
    cdef Py_ssize_t bounds[COPY_CHUNKS + 1]
    cdef Py_ssize_t c, k = COPY_CHUNKS if n >= COPY_CHUNKS * COPY_CHUNK_MIN_ROWS else 1
    cdef Runner run
    cdef Team team = work.teams.get(ISA) if work.kernel_stats[0] == 2 else None
    if n == 0:
        return
    for c in range(k + 1):
        bounds[c] = c * n // k
    cp.src, cp.dst, cp.bounds = &setpoint[0], &last_kw_out[0], bounds
    run.team, run.n_chunks, run.mine, run.rounds = NULL, k, 0, 0
    with nogil:
        if team is not None and k > 1 and v2grt_team_ensure(team.t) == 0:
            run.team = team.t
        _run_chunks(&run, <v2grt_chunk_fn>_copy_chunk, &cp)


cdef struct Copy:
    const double* src
    float* dst
    const Py_ssize_t* bounds


cdef void _copy_chunk(void* args, Py_ssize_t c) noexcept nogil:
    cdef Copy* cp = <Copy*>args
    cdef Py_ssize_t a = cp.bounds[c], b = cp.bounds[c + 1]
    _narrow(b - a, &cp.src[a], &cp.dst[a])


cdef void _narrow(Py_ssize_t m, in_f64 src, out_f32 dst) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(m):
        dst[i] = <float>src[i]


cdef struct Pass1:
    # Everything one chunk of pass 1 reads and writes, as raw pointers: the worker thread runs chunks
    # without the GIL, and memoryviews are Python objects.
    const Params* p
    Py_ssize_t n_sites, pin_row, buckets
    int stale_before, direction
    bint estop
    const u8* active
    const u8* online
    const u8* fault
    const int* site
    const u8* site_fault
    const int* tel
    const float* soc
    const float* soh
    const float* capacity_kwh
    const float* p_dis_max_kw
    const float* p_chg_max_kw
    const float* temp_c
    const float* cycle_count
    const float* efficiency
    const float* last_kw
    u8* reason
    float* dis
    float* chg
    float* window
    u16* q
    double* site_hi
    double* site_lo
    double* hist  # the kernel's histogram: chunk 0's
    double* chunk_hist  # chunks 1..: (n_chunks - 1) x buckets
    i64* counts  # out.reason_counts: chunk 0's
    i64* chunk_counts  # chunks 1..: (n_chunks - 1) x 256
    double* chunk_sums  # n_chunks x 2: [avail_dis_kw, avail_chg_kw]
    const Py_ssize_t* bounds  # n_chunks + 1 row bounds
    Pin* pin


cdef void _pass1_chunk(void* args, Py_ssize_t c) noexcept nogil:
    """Pass 1 on chunk c's rows (_availability_rows), into chunk c's histogram, reason counts and sums.
    Its run-length site sums go straight into site_hi/site_lo: a chunk starts where the site changes
    (_plan), so with each site's rows one run (_contiguity) no two chunks add into one site."""
    cdef Pass1* a = <Pass1*>args
    cdef double* hist = a.hist if c == 0 else a.chunk_hist + (c - 1) * a.buckets
    cdef i64* counts = a.counts if c == 0 else a.chunk_counts + (c - 1) * 256
    cdef double* sums = a.chunk_sums + 2 * c
    _availability_rows(a.bounds[c], a.bounds[c + 1], a, hist, counts, sums)


cdef void _availability_rows(Py_ssize_t row0, Py_ssize_t row1, const Pass1* a, double* hist_p, i64* counts_p,
                             double* sums) noexcept nogil:
    """Pass 1 on rows [row0, row1): reason, availability, ramp windows and, in the target's direction, the
    window and rank bucket per node; per-site sums of both windows (added into a.site_hi/a.site_lo), the
    bucket histogram of the direction's windows (hist_p, zeroed here), rows per reason code (counts_p,
    zeroed here; so nobody has to count a million codes again after the kernel). A pinned row that
    participates is left out of the ranking and the site sums; pin.ok and pin.site tell _allocate.
    sums: [avail_dis_kw, avail_chg_kw] of these rows.

    Works in blocks of BLOCK rows, each in three loops: the arithmetic of every row into L1 scratch
    (_block_arithmetic) and the reason chain but for its site links (_block_reasons, which writes the
    outputs and zeroes what it excludes), both branch-free so they vectorise; then one scalar loop over
    the same rows for what cannot vectorise: the per-site and per-bucket sums, and, on the rare rows it
    is told to look at, the site's links of the chain, the codes to count and the pin. (The reason chain
    was a branch per link per row in that loop: 1M nodes, 11.9 -> 10.0 ms with the telemetry ticks.)"""
    cdef const Params* p = a.p
    cdef Py_ssize_t n_sites = a.n_sites
    cdef bint estop = a.estop
    cdef Py_ssize_t i, j, s, start, m, pin_j
    cdef int b
    cdef u8 r
    cdef double sum_dis = 0.0, sum_chg = 0.0
    # Per-site window sums run in registers while consecutive rows share a site (depots are
    # contiguous blocks of rows) and are flushed when the site changes: a read-modify-write of
    # site_hi[s] per row would chain every row of a site through store-to-load forwarding.
    cdef Py_ssize_t run_site = -1
    cdef double run_hi = 0.0, run_lo = 0.0
    cdef bint run_ok = False  # the run's site exists and has no fault
    cdef u8 site_code = 0  # the run's site's exclusion (INVALID for a row outside the site table), 0: none
    # The block's scratch, in L1: availability, windows, bucket and code of every row (_block_arithmetic),
    # then masked to the rows that participate (_block_reasons), for the scalar loop's sums.
    cdef float b_dis[BLOCK]
    cdef float b_chg[BLOCK]
    cdef float b_hi[BLOCK]
    cdef float b_lo[BLOCK]
    cdef float b_w[BLOCK]
    cdef int b_q[BLOCK]
    cdef int b_code[BLOCK]
    cdef u8 b_slow[BLOCK]  # 1: the row is excluded (its code to count), 2: the pin; the scalar loop looks at it
    cdef bint excluded
    # Loop invariants in locals: read through a pointer, the compiler reloads them every row, as
    # it cannot rule out that the row stores changed them.
    cdef Py_ssize_t pin_row = a.pin_row
    cdef const u8* active_p = a.active
    cdef const u8* online_p = a.online
    cdef const u8* fault_p = a.fault
    cdef const int* site_p = a.site
    cdef const u8* site_fault_p = a.site_fault
    cdef const int* tel_p = a.tel
    cdef u8* reason_p = a.reason
    cdef float* dis_p = a.dis
    cdef float* chg_p = a.chg
    cdef float* window_p = a.window
    cdef u16* q_p = a.q
    cdef double* site_hi_p = a.site_hi
    cdef double* site_lo_p = a.site_lo
    cdef Pin* pin = a.pin
    for b in range(p.buckets):
        hist_p[b] = 0.0
    for b in range(256):
        counts_p[b] = 0
    start = row0
    while start < row1:
        m = _imin(BLOCK, row1 - start)
        _block_arithmetic(m, p, a.direction, &a.soc[start], &a.soh[start], &a.capacity_kwh[start],
                          &a.p_dis_max_kw[start], &a.p_chg_max_kw[start], &a.temp_c[start], &a.cycle_count[start],
                          &a.efficiency[start], &a.last_kw[start], b_dis, b_chg, b_hi, b_lo, b_w, b_q, b_code)
        _block_reasons(m, estop, a.stale_before, &active_p[start], &online_p[start], &fault_p[start], &tel_p[start],
                       b_code, b_q, b_dis, b_chg, b_hi, b_lo, b_w, &reason_p[start], &dis_p[start], &chg_p[start],
                       &window_p[start], &q_p[start], b_slow)
        pin_j = pin_row - start
        if 0 <= pin_j < m:
            b_slow[pin_j] |= 2
        for j in range(m):
            i = start + j
            s = site_p[i]
            if s != run_site:
                if run_ok:
                    site_hi_p[run_site] += run_hi
                    site_lo_p[run_site] += run_lo
                run_site, run_hi, run_lo = s, 0.0, 0.0
                site_code = site_fault_p[s] if 0 <= s < n_sites else R_INVALID
                run_ok = site_code == 0
            if b_slow[j] | (not run_ok):  # rare: an excluded row, a row of an excluded site, or the pin
                r = reason_p[i]
                excluded = b_slow[j] & 1
                if not run_ok and not (active_p[i] == 0 or estop or online_p[i] == 0 or fault_p[i] != 0):
                    # The site's links of the chain come after the row's own flags, before its values.
                    r = site_code
                    reason_p[i] = r
                    dis_p[i] = 0.0
                    chg_p[i] = 0.0
                    window_p[i] = 0.0
                    excluded = True
                # OK, SOC_MIN and SOC_MAX are counted per block below (an excluded row may carry
                # those codes too: a gateway's fault code), every other code here.
                if (r != R_OK) & (r != R_SOC_MIN) & (r != R_SOC_MAX):
                    counts_p[r] += 1
                if not excluded:  # the pin, participating: held at its pin, not ranked, not in the site sums
                    pin.ok, pin.site = True, s
                    window_p[i] = 0.0
                continue
            run_hi += b_hi[j]
            run_lo += b_lo[j]
            # Unconditionally: an excluded row adds 0 to its bucket, and a branch on w > 0
            # mispredicts on every row at the SoC limits.
            hist_p[b_q[j]] += b_w[j]
        # Rows per participating code, counted over the block's reasons in a loop that vectorises.
        _count_codes(&reason_p[start], m, &counts_p[0])
        # Fleet totals per block, after the rows excluded were zeroed: in four independent partial sums.
        sum_dis += _sum4f(&dis_p[start], m)
        sum_chg += _sum4f(&chg_p[start], m)
        start += m
    if run_ok:
        site_hi_p[run_site] += run_hi
        site_lo_p[run_site] += run_lo
    sums[0] = sum_dis
    sums[1] = sum_chg


cdef void _block_reasons(
    Py_ssize_t m, bint estop, int stale_before, in_u8 active, in_u8 online, in_u8 fault, in_i32 tel,
    in_i32 code, in_i32 q_in, out_f32 a_dis, out_f32 a_chg, out_f32 hi, out_f32 lo, out_f32 w_dir,
    out_u8 reason, out_f32 dis_out, out_f32 chg_out, out_f32 window_out, out_u16 q_out, out_u8 slow,
) noexcept nogil:
    """The reason chain of every row of a block but for its site's links, branch-free so it vectorises:
    free row, e-stop, offline, the gateway's fault code, then the arithmetic's INVALID, stale telemetry,
    and the arithmetic's SOH/THERMAL/SOC codes. Writes the reason, bucket, availability and window
    outputs (zero where the row is excluded) and zeroes the excluded rows' scratch windows, so the
    scalar loop adds them without asking; ``slow`` flags the rows it must still look at (excluded)."""
    cdef Py_ssize_t j
    cdef int r, c, act, onl, flt, fresh, part, e = estop
    cdef float zero = 0.0, x_w, kf
    cdef int keep[BLOCK]
    # Two loops: GCC 12 vectorises neither when the byte columns' compares and the float selects share
    # one ("no vectype" for the float loads once the byte lanes set the vector length).
    for j in range(m):
        c = code[j]
        act = active[j]
        onl = online[j]
        flt = fault[j]
        fresh = tel[j] >= stale_before
        r = c
        r = R_TIMEOUT if (fresh == 0) & (c != R_INVALID) else r
        r = flt if flt != 0 else r
        r = R_OFFLINE if onl == 0 else r
        r = R_ESTOP if e != 0 else r
        r = R_EMPTY if act == 0 else r
        # Every link of the chain but the last excludes the row, whatever its code: a gateway's fault
        # code may equal SOC_BELOW_MINIMUM and still means "do not dispatch".
        part = ((act != 0) & (e == 0) & (onl != 0) & (flt == 0) & (fresh != 0)
                & (c != R_SOH) & (c != R_THERMAL) & (c != R_INVALID))
        reason[j] = <u8>r
        slow[j] = <u8>(part == 0)
        keep[j] = part
    for j in range(m):
        # kept * 1, excluded * 0, and max(., 0) so that an excluded row's NaN or inf (0 * inf) is 0 too:
        # no select, so no load under a condition (SSE2 has no masked load: GCC left the loop scalar),
        # exact for kept rows, whose availability and windows are finite and >= 0.
        kf = <float>keep[j]
        q_out[j] = <u16>q_in[j]
        dis_out[j] = _maxf(a_dis[j] * kf, zero)
        chg_out[j] = _maxf(a_chg[j] * kf, zero)
        x_w = _maxf(w_dir[j] * kf, zero)
        window_out[j] = x_w
        w_dir[j] = x_w
        hi[j] = _maxf(hi[j] * kf, zero)
        lo[j] = _maxf(lo[j] * kf, zero)


cdef inline double _site_cap(double cap_kw, Py_ssize_t s, Py_ssize_t pin_site, double pinned_kw) noexcept nogil:
    """A site's limit in one direction, less what its pinned node takes that way (never below 0)."""
    return _max(cap_kw - pinned_kw, 0.0) if s == pin_site and pinned_kw > 0.0 else cap_kw


cdef inline double _sum4(const double* x, Py_ssize_t m) noexcept nogil:
    """Sum of x[0:m] in four interleaved partial sums (fixed order, so deterministic)."""
    cdef double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0
    cdef Py_ssize_t j = 0
    while j + 4 <= m:
        s0 += x[j]
        s1 += x[j + 1]
        s2 += x[j + 2]
        s3 += x[j + 3]
        j += 4
    while j < m:
        s0 += x[j]
        j += 1
    return (s0 + s1) + (s2 + s3)


cdef Py_ssize_t _fill_above(Py_ssize_t n, in_f32 window, in_u16 q, int b_marginal, double sign,
                            out_f64 setpoint) noexcept nogil:
    """setpoint = the window above the marginal bucket, 0 at and below it; returns the rows set.
    Multiplies by 0/1, not branches: whether a row's bucket is above the marginal one is a coin toss
    the branch predictor loses on half the rows (windows are finite and >= 0, so w * 1.0 == w and
    w * 0.0 == 0.0 exactly; windows <= MIN_TAKE_KW are already 0)."""
    cdef Py_ssize_t i
    cdef int c = 0
    cdef float take
    for i in range(n):
        take = window[i] * <float>(q[i] > b_marginal)
        setpoint[i] = sign * take
        c += take != 0.0
    return c


cdef inline void _count_codes(const u8* r, Py_ssize_t m, i64* counts) noexcept nogil:
    """counts[c] += rows of r[0:m] equal to c, for the three codes a participating row has."""
    cdef int n_ok = 0, n_min = 0, n_max = 0
    cdef Py_ssize_t j
    for j in range(m):
        n_ok += r[j] == R_OK
        n_min += r[j] == R_SOC_MIN
        n_max += r[j] == R_SOC_MAX
    counts[R_OK] += n_ok
    counts[R_SOC_MIN] += n_min
    counts[R_SOC_MAX] += n_max


cdef inline double _sum4f(const float* x, Py_ssize_t m) noexcept nogil:
    """_sum4 of a float32 column, summed in double (a block of 128 kW values in float32 would round)."""
    cdef double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0
    cdef Py_ssize_t j = 0
    while j + 4 <= m:
        s0 += x[j]
        s1 += x[j + 1]
        s2 += x[j + 2]
        s3 += x[j + 3]
        j += 4
    while j < m:
        s0 += x[j]
        j += 1
    return (s0 + s1) + (s2 + s3)


cdef void _block_arithmetic(
    Py_ssize_t m, const Params* p, int direction,
    in_f32 soc, in_f32 soh, in_f32 capacity_kwh, in_f32 p_dis_max_kw, in_f32 p_chg_max_kw, in_f32 temp_c,
    in_f32 cycle_count, in_f32 efficiency, in_f32 last_kw,
    out_f32 a_dis, out_f32 a_chg, out_f32 w_hi, out_f32 w_lo, out_f32 w_dir, out_i32 q_dir, out_i32 code,
) noexcept nogil:
    """Every row's availability, ramp windows and rank bucket as if it were eligible, plus the part of
    its reason that arithmetic decides (`code`: INVALID, SOH, THERMAL, SOC_MIN, SOC_MAX or OK, in
    that priority), into the block's scratch; _block_reasons applies the rest of the chain.
    No branches on row data, so the compiler vectorises the loop. All in float32 (eight lanes per
    AVX2 operation), the profile's values rounded to float32 once; the same expressions and operation
    order as v2grt.reference, which computes in float32 too, so availability and buckets are
    bit-identical to the twin's."""
    cdef Py_ssize_t j
    cdef float t, soc_j, soh_j, eff_j, f_temp, usable_kwh, e_dis, e_chg, ad, ac, hi, lo, x, x_carrying
    cdef float soc_term, last, w
    cdef float min_soc = <float>p.minimum_soc, max_soc = <float>p.maximum_soc, per_end = <float>p.per_endurance
    cdef float temp_min = <float>p.temp_min_c, temp_max = <float>p.temp_max_c
    cdef float inv_temp = <float>p.inv_temp_derate_c, inv_soc = <float>p.inv_soc_taper
    cdef float soh_min = <float>p.soh_threshold
    cdef float w_soc = <float>p.w_soc, w_cycles = <float>p.w_cycles, w_soh = <float>p.w_soh
    cdef float w_temp = <float>p.w_temp, inv_cycles = <float>p.inv_cycles_ref, hyst = <float>p.hysteresis
    cdef float q_scale = <float>p.q_scale
    cdef float ramp = <float>p.node_ramp_kw, top = <float>(p.buckets - 1), min_take = <float>MIN_TAKE_KW
    cdef float zero = 0.0, one = 1.0
    cdef float sign = <float>direction
    cdef float dis = one if direction > 0 else zero, chg = one if direction < 0 else zero
    cdef float c
    for j in range(m):
        t = temp_c[j]
        soc_j = soc[j]
        soh_j = soh[j]
        eff_j = efficiency[j]
        last = last_kw[j]
        # Availability: tapered near the SoC limits and temperature edges, bounded by endurance.
        f_temp = _taperf(t - temp_min, inv_temp) * _taperf(temp_max - t, inv_temp)
        usable_kwh = capacity_kwh[j] * soh_j
        e_dis = _maxf((soc_j - min_soc) * usable_kwh * eff_j * per_end, zero)
        e_chg = _maxf((max_soc - soc_j) * usable_kwh / eff_j * per_end, zero)
        ad = _minf(p_dis_max_kw[j] * _taperf(soc_j - min_soc, inv_soc) * f_temp, e_dis)
        ac = _minf(p_chg_max_kw[j] * _taperf(max_soc - soc_j, inv_soc) * f_temp, e_chg)
        a_dis[j] = ad
        a_chg[j] = ac
        # Ramp window: |power| may rise by node_ramp_kw this cycle and may always fall at once.
        hi = _minf(ad, _maxf(last, zero) + ramp)
        lo = _minf(ac, _maxf(-last, zero) + ramp)
        # A window of a mW or less is no window, and no capacity either: zeroed before the site sums
        # and the fleet's feasible power see it, or the target could promise what no node will take.
        hi = hi if hi > min_take else zero
        lo = lo if lo > min_take else zero
        w_hi[j] = hi
        w_lo[j] = lo
        # The direction enters as 0/1 weights, not as selects on a loop-invariant condition: GCC 12
        # vectorises those only in some surroundings (a small edit elsewhere turned the whole loop
        # scalar). Exact for the rows that matter: hi, lo are finite and >= 0, so hi * 1 + lo * 0 == hi.
        w = hi * dis + lo * chg
        w_dir[j] = w
        # Rank bucket in the target's direction: same expression and operation order as
        # reference.rank_buckets, so the buckets are bit-identical (the 0/1 weights are exact). Both
        # candidates of the hysteresis select are computed first: a conditional FP operation may
        # trap, so the compiler would keep a branch (and not vectorise) rather than speculate it.
        soc_term = soc_j * dis + (one - soc_j) * (one - dis)  # soc discharging, 1 - soc charging
        x = (w_soc * soc_term + w_cycles * (one - _minf(cycle_count[j] * inv_cycles, one))
             + w_soh * soh_j + w_temp * f_temp)
        x_carrying = x + hyst
        x = x_carrying if last * sign > zero else x
        x = x * q_scale
        x = x if x >= zero else zero  # also NaN
        q_dir[j] = <int>(x if x < top else top)
        # The code as a float: selects between floats vectorise where integer ones under a
        # float mask do not (SSE2).
        c = <float>R_OK
        c = <float>R_SOC_MIN if (ad == zero) & (soc_j <= min_soc) else c
        c = <float>R_SOC_MAX if (ac == zero) & (soc_j >= max_soc) else c
        c = <float>R_THERMAL if (t < temp_min) | (t > temp_max) else c
        c = <float>R_SOH if soh_j < soh_min else c
        c = c if _validf(soc_j, soh_j, capacity_kwh[j], p_dis_max_kw[j], p_chg_max_kw[j], t,
                         eff_j, cycle_count[j]) else <float>R_INVALID
        code[j] = <int>c  # converted here, eight at a time, not per row in the scalar loop


cdef void _allocate(
    Py_ssize_t n, Py_ssize_t n_sites, const Params* p, double request_kw, int direction,
    const int[::1] site, const double[::1] site_export_kw, const double[::1] site_import_kw,
    float[::1] window, u16[::1] q, double[::1] site_hi, double[::1] site_lo,
    double[::1] site_rem, double[::1] hist, i64[::1] count, int[::1] order,
    const float[::1] avail_dis, const float[::1] avail_chg, const Pin* pin,
    double[::1] setpoint_out, double[::1] totals_out, double* sums,
    Runner* run, const Py_ssize_t* bounds, i64* carrying,
) noexcept nogil:
    """Target from the request, then the setpoints: merit order (histogram threshold, or counting
    sort + greedy when a site limit binds) or pro-rata; a pinned node is placed as asked."""
    cdef Py_ssize_t i, s, k, n_part
    cdef int b, b_marginal
    cdef double feasible_dis = 0.0, feasible_chg = 0.0, target = 0.0, remaining = 0.0, take, cum, sign = 0.0
    cdef double allocated = 0.0, fraction, w, cap_dis, cap_chg, cap
    cdef double pinned = 0.0, pin_dis = 0.0, pin_chg = 0.0, pin_dir = 0.0
    cdef bint binding_dis = False, binding_chg = False, binding, summed = True
    cdef double marginal_kw = 0.0
    cdef i64 pos, c, n_carrying = 0
    cdef double[::1] site_window
    cdef const double[::1] site_cap

    # A pinned node (a test discharge) is fixed power, limited only by its availability: it uses up
    # that much of its site's limit in its direction, and of the target when it goes the target's way.
    if pin.ok:
        pinned = _min(_max(pin.kw, -avail_chg[pin.row]), avail_dis[pin.row])
        pinned = pinned if (pinned > MIN_TAKE_KW) | (pinned < -MIN_TAKE_KW) else 0.0
        pin_dis = _max(pinned, 0.0)
        pin_chg = _max(-pinned, 0.0)

    for s in range(n_sites):
        cap_dis = _site_cap(site_export_kw[s], s, pin.site, pin_dis)
        cap_chg = _site_cap(site_import_kw[s], s, pin.site, pin_chg)
        feasible_dis += _min(cap_dis, site_hi[s])
        feasible_chg += _min(cap_chg, site_lo[s])
        if site_hi[s] > cap_dis:
            binding_dis = True
        if site_lo[s] > cap_chg:
            binding_chg = True

    # Target: the request, limited by the fleet ramp, clamped to what the fleet can give.
    if direction != 0:
        target = _min(_max(request_kw, sums[0] - p.fleet_ramp_kw), sums[0] + p.fleet_ramp_kw)
        target = _min(_max(target, -(feasible_chg + pin_chg)), feasible_dis + pin_dis)
    if target != 0.0:
        sign = 1.0 if target > 0.0 else -1.0
        pin_dir = _max(pinned * sign, 0.0)  # the pinned kW that count toward the target
        remaining = _max(target * sign - pin_dir, 0.0)  # what the ranked nodes fill

    cdef Fill fill
    fill.window, fill.q, fill.setpoint, fill.bounds, fill.carrying = &window[0], &q[0], &setpoint_out[0], bounds, carrying
    if remaining <= MIN_TAKE_KW:
        _run_chunks(run, <v2grt_chunk_fn>_zero_chunk, &fill)
        summed = False  # nothing set but the pin
    else:
        if target > 0.0:
            site_window, site_cap = site_hi, site_export_kw
            binding = binding_dis
        else:
            site_window, site_cap = site_lo, site_import_kw
            binding = binding_chg
        if p.prorata:
            # Every node the same fraction of its window; windows of an over-full site scaled to its cap.
            for s in range(n_sites):
                cap = _site_cap(site_cap[s], s, pin.site, pin_dir)
                site_rem[s] = cap / site_window[s] if site_window[s] > cap else 1.0
            fraction = _min(remaining / (feasible_dis if sign > 0 else feasible_chg), 1.0)
            for i in range(n):
                take = window[i] * site_rem[site[i]] * fraction if window[i] > 0.0 else 0.0
                take = take if take > MIN_TAKE_KW else 0.0
                setpoint_out[i] = sign * take
                n_carrying += take != 0.0
        elif not binding:
            # Merit order without a sort: walk the bucket histogram from the best bucket down to the
            # one where the target runs out; better buckets are full, worse ones idle, and the
            # marginal bucket fills in row order.
            cum = 0.0
            b_marginal = -1
            for b in range(p.buckets - 1, -1, -1):
                if cum + hist[b] >= remaining:
                    b_marginal = b
                    break
                cum += hist[b]
            remaining -= cum
            marginal_kw = remaining
            # Every row above the marginal bucket full, every other idle, in a loop that vectorises;
            # then the marginal bucket's rows, in row order, take what is left.
            fill.b_marginal, fill.sign = b_marginal, sign
            _run_chunks(run, <v2grt_chunk_fn>_fill_chunk, &fill)
            for k in range(run.n_chunks):
                n_carrying += carrying[k]
            for i in range(n):
                if q[i] == b_marginal:  # rare: only the marginal bucket's rows
                    w = window[i]
                    if w > 0.0 and remaining > MIN_TAKE_KW:
                        take = _min(w, remaining)  # > MIN_TAKE_KW: both are
                        remaining -= take
                        setpoint_out[i] = sign * take
                        n_carrying += 1
            # What was set, from the sums already at hand (the buckets filled, the marginal rows' takes),
            # not a pass over the million setpoints (1M nodes: 1.03-1.04x in an in-process A/B); equal
            # to their sum but for rounding in another order, which the twin's tests allow (rtol 1e-9).
            allocated = sign * (cum + (marginal_kw - remaining))
            summed = False
        else:
            # A site limit binds: order the participants by bucket (counting sort, stable in row),
            # then fill greedily, each node taking min(window, site remainder, fleet remainder).
            for b in range(p.buckets + 1):
                count[b] = 0
            for i in range(n):
                setpoint_out[i] = 0.0
                if window[i] > 0.0:
                    count[q[i]] += 1
            pos = 0
            for b in range(p.buckets - 1, -1, -1):
                c = count[b]
                count[b] = pos
                pos += c
            n_part = pos
            for i in range(n):
                if window[i] > 0.0:
                    order[count[q[i]]] = <int>i
                    count[q[i]] += 1
            for s in range(n_sites):
                site_rem[s] = _site_cap(site_cap[s], s, pin.site, pin_dir)
            for k in range(n_part):
                if remaining <= MIN_TAKE_KW:
                    break
                i = order[k]
                s = site[i]
                take = _min(_min(window[i], site_rem[s]), remaining)
                if take > MIN_TAKE_KW:
                    site_rem[s] -= take
                    remaining -= take
                    setpoint_out[i] = sign * take
                    n_carrying += 1
    if pin.ok:
        setpoint_out[pin.row] = pinned
        n_carrying += pinned != 0.0
    # Elsewhere the sum of what was set, in one pass over the (cache-warm) setpoints; a running sum in the
    # loops above would chain every row through one add.
    if summed:
        allocated = _sum4(&setpoint_out[0], n)
    elif pin.ok:
        allocated += pinned

    totals_out[T_REQUEST_I] = request_kw
    totals_out[T_TARGET_I] = target
    totals_out[T_ALLOCATED_I] = allocated
    totals_out[T_FEASIBLE_DIS_I] = feasible_dis
    totals_out[T_FEASIBLE_CHG_I] = feasible_chg
    totals_out[T_AVAIL_DIS_I] = sums[1]
    totals_out[T_AVAIL_CHG_I] = sums[2]
    totals_out[T_N_CARRYING_I] = <double>n_carrying


assert MIN_TAKE_KW == MIN_SETPOINT_KW, "v2grt._buffers.MIN_SETPOINT_KW changed: update _kernel.pxi"
assert (COPY_CHUNKS, COPY_CHUNK_MIN_ROWS) == (MAX_CHUNKS, CHUNK_ROWS), "v2grt._buffers chunks changed: update _kernel.pxi"
assert (T_REQUEST, T_TARGET, T_ALLOCATED, T_FEASIBLE_DIS, T_FEASIBLE_CHG, T_AVAIL_DIS, T_AVAIL_CHG,
        T_N_CARRYING) == (0, 1, 2, 3, 4, 5, 6, 7), "v2grt._buffers totals layout changed: update _kernel.pxi"
assert (Reason.OK, Reason.EMPTY, Reason.OFFLINE, Reason.TIMEOUT_BMS_RESPONSE, Reason.SOH_BELOW_THRESHOLD,
        Reason.THERMAL_LIMIT, Reason.SOC_BELOW_MINIMUM, Reason.EMERGENCY_STOP, Reason.INVALID_TELEMETRY,
        Reason.SOC_ABOVE_MAXIMUM) == (0, 1, 2, 3, 4, 5, 9, 10, 11, 12), "v2grt.codes changed: update _kernel.pxi"


def stream_roofline(fleet, out):
    """Read every column the kernel reads and write every per-node output once, doing no real work.

    A measuring stick for benchmarks, not part of dispatch: the time of this pass is what memory
    bandwidth alone costs for the kernel's bytes, so kernel time / this time says how far the kernel
    is from the machine's limit. Returns a checksum so the compiler cannot drop the reads.
    """
    cdef Py_ssize_t n = fleet.n_rows
    if out.capacity < n:
        raise ValueError(f"outputs hold {out.capacity} rows, fleet has {n}")
    cdef const u8[::1] active = fleet.active
    cdef const u8[::1] online = fleet.online
    cdef const u8[::1] fault = fleet.fault
    cdef const int[::1] site = fleet.site
    cdef const float[::1] soc = fleet.soc
    cdef const float[::1] soh = fleet.soh
    cdef const float[::1] capacity_kwh = fleet.capacity_kwh
    cdef const float[::1] p_dis_max_kw = fleet.p_dis_max_kw
    cdef const float[::1] p_chg_max_kw = fleet.p_chg_max_kw
    cdef const float[::1] temp_c = fleet.temp_c
    cdef const float[::1] cycle_count = fleet.cycle_count
    cdef const float[::1] efficiency = fleet.efficiency
    cdef const int[::1] telemetry_tick = fleet.telemetry_tick
    cdef const float[::1] last_kw = fleet.last_setpoint_kw
    cdef double[::1] setpoint_out = out.setpoint_kw
    cdef float[::1] avail_dis_out = out.avail_dis_kw
    cdef float[::1] avail_chg_out = out.avail_chg_kw
    cdef u8[::1] reason_out = out.reason
    cdef Py_ssize_t i
    cdef double acc = 0.0, x
    with nogil:
        for i in range(n):
            x = (soc[i] + soh[i] + capacity_kwh[i] + p_dis_max_kw[i] + p_chg_max_kw[i] + temp_c[i]
                 + cycle_count[i] + efficiency[i] + last_kw[i] + telemetry_tick[i]
                 + active[i] + online[i] + fault[i] + site[i])
            acc += x
            setpoint_out[i] = x
            avail_dis_out[i] = x
            avail_chg_out[i] = x
            reason_out[i] = <u8>i
    return acc


# ------------------------------------------------------------------------------------ the journal's tap
from libc.math cimport NAN
from libc.string cimport memcpy

import numpy as np


cdef class JournalTap:
    """The dispatch journal's per-cycle copy on the control thread, compiled (the NumPy twin:
    v2grt.reference.JournalTap, same methods and results).

    ``record`` writes one cycle record into a slot of the journal's ring (a structured array of
    ``v2grt.journal.cycle_dtype``, packed: fields at fixed byte offsets); ``stripe`` copies one stripe of
    the vehicles' setpoint, reported power (float64 in, float32 out) and reason into a slot. Nothing is
    allocated and no buffer is acquired per call: the ring and the slots are bound once (``bind_slots``
    again after they are resized), the source columns are re-bound only when a different array object
    comes in. Both keep the GIL: they are a few microseconds, and releasing it for a copy this size let
    the bus or writer thread take it, which cost the control thread up to the 0.5 ms switch interval.
    """

    cdef unsigned char[:, ::1] ring
    cdef Py_ssize_t off[32]
    cdef Py_ssize_t n_reasons, n_inv, off_reasons, off_inv
    cdef double[::1] inv
    cdef float[:, ::1] v_sp
    cdef float[:, ::1] v_p
    cdef u8[:, ::1] v_reason
    cdef i64[:, ::1] v_meta
    cdef object _sp_obj, _p_obj, _r_obj, _c_obj
    cdef const double[::1] sp_src
    cdef const double[::1] p_src
    cdef const u8[::1] r_src
    cdef const i64[::1] c_src

    def __init__(self, ring, inv):
        """``ring``: the structured record array (its dtype's field order is CYCLE_FIELDS, then reasons,
        then inverter_kw if any); ``inv``: the float64 array record() reads the inverters' kW from."""
        dt = ring.dtype
        names = dt.names
        if len(names) > 30:
            raise ValueError(f"journal tap: {len(names)} record fields: expected at most 30")
        self.ring = ring.view(np.uint8).reshape(len(ring), dt.itemsize)
        for k, name in enumerate(names):
            self.off[k] = dt.fields[name][1]
        self.off_reasons = dt.fields["reasons"][1]
        self.n_reasons = dt.fields["reasons"][0].shape[0]
        self.n_inv = dt.fields["inverter_kw"][0].shape[0] if "inverter_kw" in dt.fields else 0
        self.off_inv = dt.fields["inverter_kw"][1] if self.n_inv else 0
        self.inv = inv

    def bind_slots(self, v_sp, v_p, v_reason, v_meta):
        """The stripe slots: float32 (slots, rows) x 2, uint8 (slots, rows), int64 (slots, 5)."""
        self.v_sp = v_sp
        self.v_p = v_p
        self.v_reason = v_reason
        self.v_meta = v_meta

    def record(self, Py_ssize_t slot, i64 t_ns, i64 epoch, i64 seq, bint published, double f_hz, double f_age_ms,
               bint frequency_stale, double service_fraction, double capacity_kw, double request_kw,
               double target_kw, double allocated_kw, double delivered_kw, double available_dis_kw,
               double available_chg_kw, int n_carrying, bint estop, int test_row, double test_kw,
               double cycle_work_ms, counts):
        """Write one record into ring[slot]; site_measured_kw = sum of ``inv`` (NaN with no inverter);
        reasons = counts[:16] (int64 in, int32 out). Returns nothing."""
        if counts is not self._c_obj:
            self.c_src = counts
            self._c_obj = counts
        cdef unsigned char* rec = &self.ring[slot, 0]
        cdef u8 b
        cdef int i32
        cdef Py_ssize_t k
        cdef double site = NAN if self.n_inv == 0 else 0.0
        for k in range(self.n_inv):
            site += self.inv[k]
        memcpy(rec + self.off[0], &t_ns, 8)
        memcpy(rec + self.off[1], &epoch, 8)
        memcpy(rec + self.off[2], &seq, 8)
        b = published
        memcpy(rec + self.off[3], &b, 1)
        memcpy(rec + self.off[4], &f_hz, 8)
        memcpy(rec + self.off[5], &f_age_ms, 8)
        b = frequency_stale
        memcpy(rec + self.off[6], &b, 1)
        memcpy(rec + self.off[7], &service_fraction, 8)
        memcpy(rec + self.off[8], &capacity_kw, 8)
        memcpy(rec + self.off[9], &request_kw, 8)
        memcpy(rec + self.off[10], &target_kw, 8)
        memcpy(rec + self.off[11], &allocated_kw, 8)
        memcpy(rec + self.off[12], &delivered_kw, 8)
        memcpy(rec + self.off[13], &site, 8)
        memcpy(rec + self.off[14], &available_dis_kw, 8)
        memcpy(rec + self.off[15], &available_chg_kw, 8)
        memcpy(rec + self.off[16], &n_carrying, 4)
        b = estop
        memcpy(rec + self.off[17], &b, 1)
        memcpy(rec + self.off[18], &test_row, 4)
        memcpy(rec + self.off[19], &test_kw, 8)
        memcpy(rec + self.off[20], &cycle_work_ms, 8)
        for k in range(self.n_reasons):
            i32 = <int>self.c_src[k]
            memcpy(rec + self.off_reasons + 4 * k, &i32, 4)
        if self.n_inv:
            memcpy(rec + self.off_inv, &self.inv[0], 8 * self.n_inv)

    def stripe(self, Py_ssize_t slot, Py_ssize_t a, Py_ssize_t b, i64 t_ns, i64 seq, i64 version,
               setpoints_kw, p_kw, reasons):
        """Copy rows [a, b) of the three columns into slot ``slot`` (setpoint and power as float32) and its
        meta row (t_ns, seq, a, b, version)."""
        if setpoints_kw is not self._sp_obj:
            self.sp_src = setpoints_kw
            self._sp_obj = setpoints_kw
        if p_kw is not self._p_obj:
            self.p_src = p_kw
            self._p_obj = p_kw
        if reasons is not self._r_obj:
            self.r_src = reasons
            self._r_obj = reasons
        cdef Py_ssize_t i, m = b - a
        cdef float* sp_out = &self.v_sp[slot, 0]
        cdef float* p_out = &self.v_p[slot, 0]
        cdef const double* sp_in = &self.sp_src[a]
        cdef const double* p_in = &self.p_src[a]
        for i in range(m):
            sp_out[i] = <float>sp_in[i]
            p_out[i] = <float>p_in[i]
        memcpy(&self.v_reason[slot, 0], &self.r_src[a], m)
        self.v_meta[slot, 0] = t_ns
        self.v_meta[slot, 1] = seq
        self.v_meta[slot, 2] = a
        self.v_meta[slot, 3] = b
        self.v_meta[slot, 4] = version
