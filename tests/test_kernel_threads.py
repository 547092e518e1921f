"""The kernel on two threads (kernel.threads: 2): the same bytes as on one, and one thread whenever two are unsafe."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from tests.test_kernel import COMPILED, fleets, kernel_module
from v2grt._buffers import KernelOutput, Workspace
from v2grt.fleet import Fleet
from v2grt.profile import DispatchProfile

OUTPUTS = ("setpoint_kw", "avail_dis_kw", "avail_chg_kw", "reason", "totals", "reason_counts")


def workspace(fleet, threads, chunk_rows=32, capacity=None):
    """A workspace whose chunks are small enough for test fleets, and which runs two threads from 0 rows
    (tests/test_kernel.py runs its twin tests on two threads through its own workspace())."""
    work = Workspace(capacity or fleet.capacity, fleet.site_capacity)
    work.threads, work.chunk_rows, work.parallel_min_rows = threads, chunk_rows, 0
    return work


def dispatch(build, fleet, work, request_kw=0.0, *, estop=False, profile=None, pin=(-1, 0.0)):
    out = KernelOutput(fleet.capacity)
    kernel_module(build).dispatch(fleet, profile or DispatchProfile(), request_kw, 0, 0.1, estop, out, work, *pin)
    return out


def contiguous(fleet):
    """The same fleet with each site's rows made one run (sorted by site), as depots and Fleet.random are."""
    n = fleet.n_rows
    fleet.site[:n] = np.sort(fleet.site[:n])
    fleet.version += 1
    return fleet


def assert_same_bytes(a, b):
    for name in OUTPUTS:
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes(), name


@pytest.mark.parametrize("build", COMPILED)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=fleets(max_n=600))
def test_two_threads_give_the_bytes_of_one(build, case):
    """On random and adversarial fleets (sites contiguous), two threads give exactly one thread's outputs,
    and the worker thread really ran chunks when there were several."""
    fleet, profile, request, estop = case
    contiguous(fleet)
    one = dispatch(build, fleet, workspace(fleet, 1), request, estop=estop, profile=profile)
    work = workspace(fleet, 2)
    for _ in range(3):  # the worker claims chunks dynamically: repeat so different splits are compared
        two = dispatch(build, fleet, work, request, estop=estop, profile=profile)
        assert_same_bytes(one, two)
    mode = work.kernel_mode()
    assert mode["threads"] == (2 if mode["chunks"] >= 2 else 1), mode


def test_a_million_rows_on_two_threads_give_the_bytes_of_one():
    """At the size the threads are for (1M vehicles, default chunks), two threads give one thread's bytes
    over cycles whose setpoints feed back, and the worker ran about half the chunks."""
    fleet = Fleet.random(1_000_000, seed=3)
    n = fleet.n_rows
    works = {t: Workspace(fleet.capacity, fleet.site_capacity) for t in (1, 2)}
    works[2].threads = 2
    worker_chunks = 0
    for request_kw in (3.0e6, -2.0e6, 5.0e5, 0.0):
        outs = {t: dispatch("cython", fleet, works[t], request_kw) for t in (1, 2)}
        assert_same_bytes(outs[1], outs[2])
        worker_chunks += works[2].kernel_mode()["worker_chunks"]
        np.copyto(fleet.last_setpoint_kw[:n], outs[1].setpoint_kw[:n])
    assert works[2].kernel_mode()["chunks"] == 32
    if len(os.sched_getaffinity(0)) >= 2:
        assert worker_chunks > 0


def test_sites_in_several_runs_run_on_one_thread_and_say_so():
    """A site whose rows are not one run would have two threads add into its sums: one thread runs, the
    kernel says why, and the outputs are one thread's."""
    fleet = Fleet.random(2000, seed=1, n_sites=10)
    fleet.site[:2000] = np.arange(2000) % 10  # every site in 200 runs
    fleet.version += 1
    work = workspace(fleet, 2)
    out = dispatch("cython", fleet, work, 500.0)
    mode = work.kernel_mode()
    assert mode["threads"] == 1 and "contiguous" in mode["why"], mode
    assert_same_bytes(out, dispatch("cython", fleet, workspace(fleet, 1), 500.0))


def test_adding_a_vehicle_to_an_earlier_site_is_seen():
    """Fleet.add bumps fleet.version, so a vehicle added at the end to a site whose rows came earlier (no
    longer one run) turns two threads off from the next cycle, and a sorted fleet turns them back on."""
    fleet = Fleet.random(2000, seed=2, n_sites=10)
    work = workspace(fleet, 2, capacity=4000)  # the one workspace (and its cached check) before and after
    dispatch("cython", fleet, work, 500.0)
    assert work.kernel_mode()["threads"] == 2
    fleet.add("EV_LATE", "gw1", "site1", soc=0.6, capacity_kwh=60.0, p_dis_max_kw=11.0, p_chg_max_kw=11.0)
    out = dispatch("cython", fleet, work, 500.0)
    assert work.kernel_mode()["threads"] == 1
    assert_same_bytes(out, dispatch("cython", fleet, workspace(fleet, 1), 500.0))


def _on_thread(fn):
    box = {}

    def body():
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised on the test's thread
            box["error"] = exc

    t = threading.Thread(target=body)
    t.start()
    t.join(60)
    if "error" in box:
        raise box["error"]
    return box["value"]


def test_a_caller_on_one_cpu_runs_one_thread_with_the_same_bytes():
    """With the calling thread pinned to one CPU (realtime.cpu_affinity: [N]) the worker would share that
    CPU: one thread runs, the kernel says so, and the outputs are unchanged."""
    fleet = Fleet.random(3000, seed=4)
    one = dispatch("cython", fleet, workspace(fleet, 1, chunk_rows=256), 800.0)

    def pinned():
        os.sched_setaffinity(threading.get_native_id(), {sorted(os.sched_getaffinity(0))[0]})
        work = workspace(fleet, 2, chunk_rows=256)
        return dispatch("cython", fleet, work, 800.0), work.kernel_mode()

    out, mode = _on_thread(pinned)
    assert mode["threads"] == 1 and "one CPU" in mode["why"], mode
    assert_same_bytes(one, out)


def _kernel_worker_tids() -> list[int]:
    tids = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                if f.read().strip() == "v2grt-kernel":
                    tids.append(int(task))
        except OSError:
            continue
    return tids


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_the_worker_runs_at_the_callers_priority_on_its_cpus():
    """The worker thread is started from the thread that dispatches, so it has that thread's SCHED_FIFO
    priority and CPUs; a call from another thread starts it again under that one's, and the old one ends."""
    fleet = Fleet.random(3000, seed=5)
    work = workspace(fleet, 2, chunk_rows=256)
    cpus = set(sorted(os.sched_getaffinity(0))[:2])
    before = set(_kernel_worker_tids())

    def control():
        tid = threading.get_native_id()
        os.sched_setaffinity(tid, cpus)
        try:
            os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(7))
        except PermissionError:
            pytest.skip("SCHED_FIFO not permitted here")
        try:
            dispatch("cython", fleet, work, 800.0)
            new = [t for t in _kernel_worker_tids() if t not in before]
            return work.kernel_mode(), [(os.sched_getscheduler(t), os.sched_getparam(t).sched_priority,
                                         os.sched_getaffinity(t)) for t in new]
        finally:
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))

    mode, workers = _on_thread(control)
    assert mode["threads"] == 2, mode
    assert workers == [(os.SCHED_FIFO, 7, cpus)]
    # Called from this (SCHED_OTHER) thread now: a worker of its own, the FIFO one joined.
    dispatch("cython", fleet, work, 800.0)
    new = [t for t in _kernel_worker_tids() if t not in before]
    assert len(new) == 1 and os.sched_getscheduler(new[0]) == os.SCHED_OTHER
    work.teams.clear()  # the Team is collected: its worker is stopped and joined
    assert [t for t in _kernel_worker_tids() if t not in before] == []


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_a_forked_child_starts_a_worker_of_its_own():
    """A child forked after the worker started (a daemonising service) has no worker thread: its kernel starts
    one of its own (whose chunks show in kernel_mode) instead of counting on (or joining) its parent's, and
    gives the same bytes."""
    import time

    fleet = Fleet.random(200_000, seed=6)
    work = workspace(fleet, 2, chunk_rows=8192)
    parent = dispatch("cython", fleet, work, 8.0e5)
    assert work.kernel_mode()["threads"] == 2
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 if its own worker ran chunks and the bytes are the parent's
        ok = False
        try:
            worker_chunks = 0
            for _ in range(20):
                child = dispatch("cython", fleet, work, 8.0e5)
                worker_chunks += work.kernel_mode()["worker_chunks"]
            ok = worker_chunks > 0 and all(
                getattr(child, name).tobytes() == getattr(parent, name).tobytes() for name in OUTPUTS)
            work.teams.clear()  # stops (joins) the child's own worker
        finally:
            os._exit(0 if ok else 1)
    deadline = time.monotonic() + 30
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            pytest.fail("the forked child's kernel did not return within 30 s")
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("build", COMPILED)
def test_stored_setpoints_are_np_copyto_s(build, threads):
    """store_setpoints (the Dispatcher's feedback into last_setpoint_kw, on the kernel's threads) writes what
    np.copyto writes, float64 to float32, to the bit, and nothing past the rows asked for."""
    fleet = Fleet.random(300_000, seed=7)
    n = fleet.n_rows
    work = Workspace(fleet.capacity, fleet.site_capacity)
    work.threads = threads
    out = dispatch(build, fleet, work, 2.0e5)
    out.setpoint_kw[:n] += np.random.default_rng(0).normal(0.0, 1e-3, n)  # values float32 must round
    expected = np.zeros(fleet.capacity + 5, np.float32)
    np.copyto(expected[:n - 3], out.setpoint_kw[:n - 3])
    got = np.zeros(fleet.capacity + 5, np.float32)
    kernel_module(build).store_setpoints(out, got, n - 3, work)
    assert got.tobytes() == expected.tobytes()
    assert work.kernel_mode()["threads"] == threads


def test_a_dispatcher_on_two_threads_steps_like_one_on_one():
    """Two Dispatchers on copies of one fleet, kernel_threads 1 and 2, give the same setpoints cycle after
    cycle, with each cycle's setpoints fed back into the fleet (ramps and hysteresis see them)."""
    from v2grt.dispatch import Dispatcher

    fleets = [Fleet.random(120_000, seed=8) for _ in range(2)]
    ds = [Dispatcher(f, capacity_kw=5.0e5, kernel_threads=t) for f, t in zip(fleets, (1, 2))]
    for k, f_hz in enumerate((49.9, 49.8, 50.15, 49.95, 50.3)):
        rs = [d.step(f_hz, now_ns=10**9 * (k + 1)) for d in ds]
        assert rs[0].setpoints_kw.tobytes() == rs[1].setpoints_kw.tobytes(), k
        assert fleets[0].last_setpoint_kw.tobytes() == fleets[1].last_setpoint_kw.tobytes(), k
    assert ds[1].kernel_mode()["threads"] == 2 and ds[0].kernel_mode()["threads"] == 1
