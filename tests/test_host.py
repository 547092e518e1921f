"""Host inspection (v2grt.host): each check reads a made-up /proc and /sys tree and says what to change, and why."""

from __future__ import annotations

from pathlib import Path

from v2grt import host


def tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / rel.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


def test_preempt_rt_is_ok_and_a_voluntary_dynamic_kernel_is_a_warning(tmp_path):
    """PREEMPT_RT passes; PREEMPT_DYNAMIC in voluntary mode warns and names preempt=full and the RT kernel."""
    rt = host.preemption(tree(tmp_path / "a", {"/sys/kernel/realtime": "1"}), "#1 SMP PREEMPT_RT")
    assert rt.status == host.OK
    vol = host.preemption(tree(tmp_path / "b", {"/sys/kernel/debug/sched/preempt": "none (voluntary) full"}),
                          "#1 SMP PREEMPT_DYNAMIC")
    assert vol.status == host.WARN and "voluntary" in vol.value
    assert "preempt=full" in vol.change and "linux-image-rt" in vol.change and vol.why
    full = host.preemption(tree(tmp_path / "c", {"/proc/cmdline": "quiet preempt=full"}), "#1 SMP PREEMPT_DYNAMIC")
    assert full.status == host.ADVICE and full.value.endswith("mode full")


def test_preempt_on_the_command_line_after_the_init_separator_is_not_the_kernels(tmp_path):
    """Words after `--` on /proc/cmdline belong to init: preempt=full there does not count."""
    f = host.preemption(tree(tmp_path, {"/proc/cmdline": "quiet -- preempt=full"}), "#1 SMP PREEMPT_DYNAMIC")
    assert "mode unknown" in f.value


def test_isolation_is_ok_only_when_the_control_cpu_is_isolated(tmp_path):
    """A pinned control thread on an isolated CPU passes; pinned elsewhere while a CPU is isolated warns."""
    root = tree(tmp_path, {"/sys/devices/system/cpu/isolated": "2-3", "/sys/devices/system/cpu/nohz_full": "3"})
    assert host.isolation(root, [3]).status == host.OK
    off = host.isolation(root, [0])
    assert off.status == host.WARN and "cpu_affinity: [2]" in off.change
    assert host.isolation(tree(tmp_path / "none", {}), None).status == host.ADVICE


def test_irqs_that_may_run_on_the_control_cpu_are_named(tmp_path):
    """IRQs whose affinity includes the control CPU are listed with the file to change."""
    root = tree(tmp_path, {"/proc/irq/default_smp_affinity": "3", "/proc/irq/24/smp_affinity_list": "0-1",
                           "/proc/irq/25/smp_affinity_list": "0"})
    f = host.irq_affinity(root, [1])
    assert f.status == host.ADVICE and "(IRQ 24)" in f.value
    assert "/proc/irq/N/smp_affinity" in f.change
    assert host.irq_affinity(root, [3]).status == host.OK


def test_governor_smt_throttling_and_clocksource(tmp_path):
    """powersave is advice with the cpupower command; SMT on is advice; throttling off and a slow clock are named."""
    root = tree(tmp_path, {
        "/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor": "powersave",
        "/sys/devices/system/cpu/cpu1/cpufreq/scaling_governor": "performance",
        "/sys/devices/system/cpu/smt/active": "1", "/sys/devices/system/cpu/smt/control": "on",
        "/proc/sys/kernel/sched_rt_runtime_us": "-1", "/proc/sys/kernel/sched_rt_period_us": "1000000",
        "/sys/devices/system/cpu/clocksource/clocksource0/current_clocksource": "hpet",
    })
    g = host.governor(root)
    assert g.status == host.ADVICE and "powersave (1 CPUs)" in g.value and "performance" in g.change
    assert host.smt(root).status == host.ADVICE
    t = host.rt_throttling(root)
    assert t.status == host.ADVICE and "950000" in t.change
    c = host.clocksource(tree(tmp_path / "cs", {
        "/sys/devices/system/clocksource/clocksource0/current_clocksource": "hpet"}))
    assert c.status == host.ADVICE and "tsc" in c.change


def test_sched_fifo_refused_is_a_warning_with_the_units_settings():
    """A refused SCHED_FIFO warns and points at the shipped unit's capability and limit."""
    f = host.sched_fifo(False, "SCHED_FIFO 50 refused: [Errno 1]", 50, running_as_root=False)
    assert f.status == host.WARN and "LimitRTPRIO" in f.change and "CAP_SYS_NICE" in f.change
    assert host.sched_fifo(False, "not asked", 0, running_as_root=False).status == host.WARN


def test_a_missing_file_is_a_finding_not_an_error(tmp_path):
    """Every check runs on an empty tree and says what it could not see."""
    findings = host.inspect(None, 50, True, "granted", 10**6, root=tmp_path)
    assert len({f.check for f in findings}) == len(findings) >= 10
    assert all(f.status in (host.OK, host.ADVICE, host.WARN, host.INFO) for f in findings)
