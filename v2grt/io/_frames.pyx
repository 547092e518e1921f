# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Setpoint frames, compiled: one pass that fills every gateway's laid-out frame, and one call that sends them.

The compiled path of wire.SetpointFrames (its NumPy twin, with the same results, is SetpointFrames's own
``backend="reference"`` code). No Python per gateway or per node: at 1,000 gateways the twin's per-gateway
slices and pyzmq sends (each taking and dropping the GIL) cost 5-11 ms a cycle here, the compiled send 0.6 ms
(`v2grt bench sends`, docs/benchmarks.md "The publisher thread"). fill keeps the GIL (~0.1-0.3 ms: giving it
up invites another thread in for up to a switch interval); send runs without it.
"""

from libc.errno cimport EAGAIN, EINTR
from libc.stdint cimport int64_t, uint8_t
from libc.string cimport memcpy

ctypedef fused real_t:
    float
    double

# libzmq's zmq_send and zmq_errno, called through the addresses pyzmq's own libzmq exports (v2grt.io.wire
# resolves them with ctypes), so the socket handle is always used with the library that made it.
ctypedef int (*zmq_send_t)(void *socket, const void *buf, size_t len, int flags) noexcept nogil
ctypedef int (*zmq_errno_t)() noexcept nogil

cdef int ZMQ_DONTWAIT = 1


cdef enum:
    CHUNK = 512  # nodes converted and checked at a time, in L1 (a gateway's slice of the frames is copied from it)


def fill(const real_t[::1] p_kw, const uint8_t[::1] reasons, const int64_t[::1] rows, bint gather,
         uint8_t[::1] buf, const int64_t[::1] starts, const int64_t[::1] off_common, const int64_t[::1] off_p,
         const int64_t[::1] off_r, const uint8_t[::1] common, const uint8_t[::1] known_reason, float limit_kw,
         bint estop):
    """Write the cycle into every gateway's frame in ``buf``; the index of the first wild node, or -1.

    Equals, for gateway k, its nodes j in starts[k]..starts[k+1] (n_k of them) and their fleet rows
    ``r = rows[j] if gather else j``::

        buf[off_common[k]:off_common[k] + len(common)] = common          # the cycle's header fields
        buf[off_p[k]:off_p[k] + 4*n_k] = p_kw[r].astype("<f4").tobytes()
        buf[off_r[k]:off_r[k] + n_k] = reasons[r]

    with wire._check_setpoints's checks on the float32 values: finite and |p| <= limit_kw, 0 under an e-stop,
    a known Reason code (known_reason[code] != 0). With a wild node it returns that node's index j, the first
    in frame order; the frames are then partly written and must not be sent (the caller raises). One pass over
    the inputs and the frames (at 100,000 nodes the frames are 2 MB: an intermediate float32 copy and second
    passes cost ~2x in the cycle, where the caches are cold from the kernel). Little-endian hosts only (the
    caller checks).
    """
    cdef Py_ssize_t n_gw = starts.shape[0] - 1
    if n_gw < 0 or off_common.shape[0] < n_gw or off_p.shape[0] < n_gw or off_r.shape[0] < n_gw:
        raise ValueError("fill: starts has one entry more than the gateways' offsets")
    if known_reason.shape[0] != 256:
        raise ValueError("fill: known_reason must have 256 entries (one per uint8 code)")
    cdef Py_ssize_t k, n_common = common.shape[0], n_buf = buf.shape[0], n, j
    cdef Py_ssize_t n_nodes = starts[n_gw] if n_gw > 0 else 0
    cdef Py_ssize_t n_rows = min(p_kw.shape[0], reasons.shape[0])
    if n_nodes > (rows.shape[0] if gather else n_rows):
        raise ValueError(f"fill: {n_nodes} nodes in the frames, more than the rows or setpoints given")
    for k in range(n_gw):  # the layout is the caller's; a wrong one must not write outside the buffer
        n = starts[k + 1] - starts[k]
        if not (n >= 0 and 0 <= off_common[k] and off_common[k] + n_common <= n_buf and 0 <= off_p[k]
                and off_p[k] + 4 * n <= n_buf and 0 <= off_r[k] and off_r[k] + n <= n_buf):
            raise ValueError(f"fill: gateway {k}'s frame does not fit the buffer of {n_buf} bytes")
    if gather:
        for j in range(n_nodes):
            if not 0 <= rows[j] < n_rows:
                raise ValueError(f"fill: node {j} of the frames maps to row {rows[j]}, outside the {n_rows} given")
    cdef int known_below = -1  # every code 0..known_below is known
    while known_below < 255 and known_reason[known_below + 1]:
        known_below += 1
    if n_nodes == 0:
        for k in range(n_gw):
            if n_common:
                memcpy(&buf[off_common[k]], &common[0], n_common)
        return -1
    # The GIL is kept: ~0.1 ms, on the control thread, where giving it up lets any other Python thread in for
    # up to a switch interval (0.5 ms) before the cycle gets it back.
    return _fill(&p_kw[0], &reasons[0], &rows[0] if gather else NULL, &buf[0], &starts[0], &off_common[0],
                 &off_p[0], &off_r[0], n_gw, &common[0] if n_common else NULL, n_common, &known_reason[0],
                 known_below, limit_kw, estop)


cdef Py_ssize_t _fill(const real_t *p_kw, const uint8_t *reasons, const int64_t *rows, uint8_t *out,
                      const int64_t *starts, const int64_t *off_common, const int64_t *off_p, const int64_t *off_r,
                      Py_ssize_t n_gw, const uint8_t *common, Py_ssize_t n_common, const uint8_t *known,
                      int known_below, float limit_kw, bint estop) noexcept nogil:
    cdef float p32[CHUNK]
    cdef uint8_t r8[CHUNK]
    cdef const uint8_t *rs
    cdef Py_ssize_t k, a, b, c, m, i
    cdef int ok = 1
    cdef uint8_t top = 0
    cdef float f
    for k in range(n_gw):
        a, b = starts[k], starts[k + 1]
        if n_common:
            memcpy(out + off_common[k], common, n_common)
        c = a
        while c < b:
            m = b - c if b - c < CHUNK else CHUNK
            if rows == NULL:
                for i in range(m):  # vectorised: the conversion, the range check, the reasons' maximum
                    f = <float>p_kw[c + i]
                    p32[i] = f
                    ok &= (f <= limit_kw) & (f >= -limit_kw)  # NaN fails both comparisons
                rs = reasons + c
            else:
                for i in range(m):
                    f = <float>p_kw[rows[c + i]]
                    p32[i] = f
                    ok &= (f <= limit_kw) & (f >= -limit_kw)
                    r8[i] = reasons[rows[c + i]]
                rs = r8
            for i in range(m):
                top = rs[i] if rs[i] > top else top
            if estop:
                for i in range(m):
                    ok &= p32[i] == 0.0
            memcpy(out + off_p[k] + 4 * (c - a), p32, 4 * m)
            memcpy(out + off_r[k] + (c - a), rs, m)
            c += m
    if top > known_below:  # a code above the known block: a table lookup per node decides (rare)
        for k in range(starts[n_gw]):
            ok &= known[reasons[k if rows == NULL else rows[k]]]
    if ok:
        return -1
    for k in range(starts[n_gw]):  # a wild value: find the first (only in a cycle the caller refuses)
        i = k if rows == NULL else rows[k]
        f = <float>p_kw[i]
        if not (f <= limit_kw and f >= -limit_kw) or (estop and f != 0.0) or not known[reasons[i]]:
            return k
    return -1


def send(size_t socket, size_t send_fn, size_t errno_fn, const uint8_t[::1] buf, const int64_t[::1] f0,
         const int64_t[::1] f1):
    """Send ``buf[f0[k]:f1[k]]`` for every k as one message each (ZMQ_DONTWAIT), in one call without the GIL.

    Equals ``for k: sock.send(buf[f0[k]:f1[k]], zmq.NOBLOCK)`` with EAGAIN counted instead of raised (a PUB
    refuses a message only as a whole, at its HWM) and EINTR retried. Returns (sent, dropped, errno):
    errno is 0, or the libzmq error that stopped the loop at message ``sent + dropped`` (the caller raises).
    ``socket`` is pyzmq's ``Socket.underlying``; the caller owns the socket on this thread and does not close
    it during the call.
    """
    cdef zmq_send_t zsend = <zmq_send_t>send_fn
    cdef zmq_errno_t zerrno = <zmq_errno_t>errno_fn
    cdef void *sock = <void *>socket
    cdef Py_ssize_t n = f0.shape[0], k, sent = 0, dropped = 0
    cdef int rc, err = 0
    cdef const uint8_t *base = &buf[0] if buf.shape[0] else NULL
    if f1.shape[0] != n:
        raise ValueError("send: f0 and f1 differ in length")
    for k in range(n):
        if not (0 <= f0[k] <= f1[k] <= buf.shape[0]):
            raise ValueError(f"send: message {k} spans {f0[k]}..{f1[k]}, outside the buffer of {buf.shape[0]} bytes")
    if sock == NULL or zsend == NULL or zerrno == NULL:
        raise ValueError("send: a NULL socket or libzmq function")
    with nogil:
        for k in range(n):
            while True:
                rc = zsend(sock, base + f0[k], <size_t>(f1[k] - f0[k]), ZMQ_DONTWAIT)
                if rc >= 0:
                    sent += 1
                    break
                err = zerrno()
                if err == EINTR:
                    continue
                if err == EAGAIN:
                    dropped += 1
                    err = 0
                break
            if err:
                break
    return sent, dropped, err
