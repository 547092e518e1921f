"""What a control engineer checks on a host before trusting it with a real-time period: read, never changed.

Each check reads /proc and /sys (under `root`, so tests can hand it a made-up tree) and returns a
Finding: what was seen, whether it helps or hurts a periodic SCHED_FIFO control thread, and the setting
an engineer would change, with why. Nothing here needs privileges; a file that cannot be read is a
finding too ("unknown"), never an exception.

Statuses: "ok" (as a tuned real-time host has it), "advice" (works, but costs tail latency the settings
below would remove), "warn" (likely to cost deadlines), "info" (context, nothing to change).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import resource
from pathlib import Path

OK, ADVICE, WARN, INFO = "ok", "advice", "warn", "info"


@dataclasses.dataclass(frozen=True)
class Finding:
    check: str  # e.g. "preemption"
    status: str  # ok | advice | warn | info
    value: str  # what was seen, as text
    change: str = ""  # the setting to change ("" when none)
    why: str = ""  # what it does for the control loop

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _read(root: Path, rel: str) -> str | None:
    try:
        return (root / rel.lstrip("/")).read_text().strip()
    except OSError:
        return None


def _cpulist(text: str | None) -> set[int]:
    """'0-3,8,10-11' -> {0,1,2,3,8,10,11}; '' or None -> empty."""
    cpus: set[int] = set()
    for part in (text or "").replace("\n", ",").split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            cpus.update(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            continue
    return cpus


def _cmdline_value(cmdline: str, key: str) -> str | None:
    for word in cmdline.split():
        if word.startswith(key + "="):
            return word.split("=", 1)[1]
        if word == "--":  # what follows belongs to init, not the kernel
            break
    return None


# ---------------------------------------------------------------------------------------------- checks
def preemption(root: Path, uname_version: str) -> Finding:
    """PREEMPT_RT bounds the time from a timer interrupt to the control thread running; a voluntary or
    non-preemptible kernel lets a long kernel path (I/O, page reclaim) delay it by milliseconds."""
    realtime = _read(root, "/sys/kernel/realtime")
    dyn = _read(root, "/sys/kernel/debug/sched/preempt")  # e.g. "none voluntary (full)" (debugfs)
    cmdline = _read(root, "/proc/cmdline") or ""
    if realtime == "1" or "PREEMPT_RT" in uname_version:
        return Finding("preemption", OK, "PREEMPT_RT")
    rt_kernel = ("install a PREEMPT_RT kernel (Debian: apt-get install linux-image-rt-amd64) and reboot into it")
    why = ("PREEMPT_RT makes almost all kernel code preemptible, which bounds wake-up lateness to tens of "
           "microseconds. Without it a long non-preemptible kernel section delays the control thread's wake-up.")
    if "PREEMPT_DYNAMIC" in uname_version:
        mode = None
        if dyn:
            mode = next((w.strip("()") for w in dyn.split() if w.startswith("(")), None)
        mode = mode or _cmdline_value(cmdline, "preempt")
        if mode == "full":
            return Finding("preemption", ADVICE, "PREEMPT_DYNAMIC, mode full", rt_kernel, why)
        if mode:
            return Finding("preemption", WARN, f"PREEMPT_DYNAMIC, mode {mode}",
                           "boot with preempt=full (kernel command line), or better " + rt_kernel, why)
        return Finding("preemption", ADVICE, "PREEMPT_DYNAMIC, mode unknown (needs debugfs: "
                       "/sys/kernel/debug/sched/preempt; no preempt= on the command line)",
                       "boot with preempt=full, or better " + rt_kernel, why)
    if " PREEMPT " in f" {uname_version} ":
        return Finding("preemption", ADVICE, "PREEMPT (full preemption)", rt_kernel, why)
    return Finding("preemption", WARN, "voluntary or no kernel preemption", rt_kernel, why)


def governor(root: Path) -> Finding:
    """A CPU that clocks down between cycles wakes slowly and runs the cycle slower."""
    govs = {}
    for path in sorted((root / "sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq/scaling_governor")):
        govs[path.parent.parent.name] = path.read_text().strip()
    if not govs:
        return Finding("cpu_governor", INFO, "no cpufreq (a VM, or frequency fixed by firmware)", "",
                       "nothing to set here; on bare metal set the governor to performance")
    kinds = sorted(set(govs.values()))
    value = ", ".join(f"{g} ({sum(v == g for v in govs.values())} CPUs)" for g in kinds)
    if kinds == ["performance"]:
        return Finding("cpu_governor", OK, value)
    return Finding("cpu_governor", ADVICE, value, "cpupower frequency-set -g performance (and disable deep "
                   "C-states: processor.max_cstate=1 or hold /dev/cpu_dma_latency at 0)",
                   "a CPU clocked down between cycles takes longer to wake and to run the cycle; performance "
                   "keeps it at full clock")


def smt(root: Path) -> Finding:
    """A hyperthread sibling shares the core's execution units and caches with the control thread."""
    active = _read(root, "/sys/devices/system/cpu/smt/active")
    control = _read(root, "/sys/devices/system/cpu/smt/control")
    if active == "1":
        return Finding("smt", ADVICE, f"on (control: {control})", "boot with nosmt, or keep the control CPU's "
                       "sibling (/sys/devices/system/cpu/cpuN/topology/thread_siblings_list) idle and isolated",
                       "work on the sibling thread slows the control thread's cycle by sharing the core")
    if active == "0":
        return Finding("smt", OK, f"off (control: {control})")
    return Finding("smt", INFO, "unknown (no /sys/devices/system/cpu/smt)")


def isolation(root: Path, control_cpus: list[int] | None) -> Finding:
    """An isolated CPU (isolcpus/nohz_full) runs the control thread without the scheduler tick and other work."""
    isolated = _cpulist(_read(root, "/sys/devices/system/cpu/isolated"))
    nohz = _cpulist(_read(root, "/sys/devices/system/cpu/nohz_full"))
    value = (f"isolated: {sorted(isolated) or 'none'}; nohz_full: {sorted(nohz) or 'none'}; "
             f"realtime.cpu_affinity: {control_cpus or 'not pinned'}")
    change = ("boot with isolcpus=managed_irq,domain,N nohz_full=N rcu_nocbs=N for one CPU N, and set "
              "realtime.cpu_affinity: [N] in the config")
    why = ("on an isolated CPU nothing else is scheduled and the periodic tick is stopped, so the control thread "
           "wakes on time and its cycle is not interrupted")
    if control_cpus and set(control_cpus) <= isolated:
        return Finding("cpu_isolation", OK, value)
    if control_cpus and isolated:
        return Finding("cpu_isolation", WARN, value, "pin the control thread to an isolated CPU "
                       f"(realtime.cpu_affinity: [{min(isolated)}])", why)
    return Finding("cpu_isolation", ADVICE, value, change, why)


def rt_throttling(root: Path) -> Finding:
    """sched_rt_runtime_us caps what all SCHED_FIFO threads may use per sched_rt_period_us."""
    runtime = _read(root, "/proc/sys/kernel/sched_rt_runtime_us")
    period = _read(root, "/proc/sys/kernel/sched_rt_period_us")
    if runtime is None or period is None:
        return Finding("rt_throttling", INFO, "unknown (no /proc/sys/kernel/sched_rt_*)")
    value = f"sched_rt_runtime_us={runtime} of sched_rt_period_us={period}"
    if runtime == "-1":
        return Finding("rt_throttling", ADVICE, value + " (off)", "echo 950000 > /proc/sys/kernel/sched_rt_runtime_us",
                       "with throttling off, a runaway SCHED_FIFO thread can starve the CPU for good (sshd, the "
                       "watchdog); the control thread uses a few % of its CPU, so the default 95 % never binds it")
    try:
        share = int(runtime) / int(period)
    except (ValueError, ZeroDivisionError):
        return Finding("rt_throttling", INFO, value)
    if share < 0.5:
        return Finding("rt_throttling", WARN, value, "echo 950000 > /proc/sys/kernel/sched_rt_runtime_us",
                       "real-time threads are throttled early: a long cycle could be parked until the next rt period")
    return Finding("rt_throttling", OK, value + f" ({share:.0%}: a safety net the control thread never reaches)")


def irq_affinity(root: Path, control_cpus: list[int] | None) -> Finding:
    """Interrupts handled on the control CPU run ahead of the control thread (their handlers are not threads
    unless PREEMPT_RT)."""
    default = _read(root, "/proc/irq/default_smp_affinity")
    on_control = []
    total = 0
    for d in sorted((root / "proc/irq").glob("[0-9]*")):
        cpus = _cpulist(_read(root, f"/proc/irq/{d.name}/smp_affinity_list"))
        if not cpus:
            continue
        total += 1
        if control_cpus and cpus & set(control_cpus):
            on_control.append(d.name)
    value = f"default_smp_affinity={default}; {total} IRQs with an affinity"
    if not control_cpus:
        return Finding("irq_affinity", INFO, value + "; control thread not pinned, so every CPU takes IRQs",
                       "pin the control thread (realtime.cpu_affinity) and steer IRQs off that CPU",
                       "an interrupt on the control CPU delays its wake-up by the handler's time")
    if on_control:
        return Finding("irq_affinity", ADVICE, value + f"; {len(on_control)} may run on control CPU(s) "
                       f"{control_cpus} (IRQ {', '.join(on_control[:8])}{', ...' if len(on_control) > 8 else ''})",
                       "write a mask without the control CPU to /proc/irq/default_smp_affinity and each "
                       "/proc/irq/N/smp_affinity (or IRQBALANCE_BANNED_CPUS for irqbalance)",
                       "an interrupt on the control CPU delays its wake-up by the handler's time")
    return Finding("irq_affinity", OK, value + f"; none on control CPU(s) {control_cpus}")


def memlock(running_as_root: bool, fleet_bytes: int) -> Finding:
    """mlockall keeps the fleet arrays and the interpreter in RAM: no page fault in the cycle."""
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)

    def fmt(v):
        return "unlimited" if v == resource.RLIM_INFINITY else f"{v / 2**20:.0f} MiB"

    value = f"RLIMIT_MEMLOCK soft {fmt(soft)}, hard {fmt(hard)}; fleet arrays ~{fleet_bytes / 2**20:.0f} MiB"
    change = "LimitMEMLOCK=infinity in the unit (configs/v2grt.service sets it) or CAP_IPC_LOCK"
    why = "without mlockall a page of the fleet or of the interpreter can be paged out and fault inside a cycle"
    if soft == resource.RLIM_INFINITY:
        return Finding("memlock", OK, value)
    if running_as_root:
        return Finding("memlock", INFO, value + " (root here: mlockall is granted anyway; the service "
                       "account needs the unit's limit)", change, why)
    return Finding("memlock", WARN, value, change, why)


def sched_fifo(granted: bool, detail: str, priority: int, running_as_root: bool) -> Finding:
    """Whether the control thread gets SCHED_FIFO at the configured priority (tried on a throw-away thread)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_RTPRIO)
    value = f"{detail}; RLIMIT_RTPRIO {'unlimited' if soft == resource.RLIM_INFINITY else soft}"
    change = ("run as the shipped unit does (configs/v2grt.service: AmbientCapabilities=CAP_SYS_NICE, "
              "LimitRTPRIO=90) and set realtime.sched_fifo_priority (e.g. 50)")
    why = ("under SCHED_OTHER any busy process on the CPU shares it with the control thread; SCHED_FIFO "
           "runs the cycle as soon as it wakes")
    if priority <= 0:
        return Finding("sched_fifo", WARN, "not configured (realtime.sched_fifo_priority: 0)", change, why)
    if granted and running_as_root:
        return Finding("sched_fifo", OK, value + " (measured as root: the service account needs the unit's "
                       "CAP_SYS_NICE/LimitRTPRIO, which configs/v2grt.service grants)")
    if granted:
        return Finding("sched_fifo", OK, value)
    return Finding("sched_fifo", WARN, value, change, why)


def clocksource(root: Path) -> Finding:
    cur = _read(root, "/sys/devices/system/clocksource/clocksource0/current_clocksource")
    if cur is None:
        return Finding("clocksource", INFO, "unknown")
    if cur in ("tsc", "arch_sys_counter"):
        return Finding("clocksource", OK, cur)
    return Finding("clocksource", ADVICE, cur, "use the TSC (tsc=reliable if the firmware's TSC is stable)",
                   f"reading the clock through {cur} costs microseconds per call; the loop reads it several "
                   "times a cycle")


def virtualization(root: Path) -> Finding:
    """A vCPU can be descheduled by the hypervisor whatever the guest's priorities: steal time."""
    cpuinfo = _read(root, "/proc/cpuinfo") or ""
    is_vm = any(line.startswith("flags") and " hypervisor" in line for line in cpuinfo.splitlines())
    steal_share = None
    stat = _read(root, "/proc/stat") or ""
    for line in stat.splitlines():
        if line.startswith("cpu "):
            fields = [int(x) for x in line.split()[1:]]
            if len(fields) >= 8 and sum(fields):
                steal_share = fields[7] / sum(fields)
            break
    steal = "" if steal_share is None else f"; steal {steal_share:.2%} of CPU time since boot"
    if not is_vm:
        return Finding("virtualization", OK, "bare metal (no hypervisor flag)" + steal)
    return Finding("virtualization", ADVICE, "virtual machine" + steal, "dedicated (pinned) vCPUs, or bare metal",
                   "the host can deschedule a vCPU for milliseconds whatever the guest's priorities; no guest "
                   "setting bounds that")


def inspect(control_cpus: list[int] | None, priority: int, fifo_granted: bool, fifo_detail: str,
            fleet_bytes: int, root: str | Path = "/") -> list[Finding]:
    """Every check, in the order a control engineer reads them."""
    root = Path(root)
    as_root = os.geteuid() == 0
    return [
        preemption(root, platform.uname().version),
        sched_fifo(fifo_granted, fifo_detail, priority, as_root),
        isolation(root, control_cpus),
        irq_affinity(root, control_cpus),
        smt(root),
        governor(root),
        rt_throttling(root),
        memlock(as_root, fleet_bytes),
        clocksource(root),
        virtualization(root),
    ]
