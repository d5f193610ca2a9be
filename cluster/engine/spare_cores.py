"""How many of this machine's cores the other processes leave to this one, from the machine's busy
time (Linux /proc/stat) less this process's own CPU time. A replica asks before it widens a prefill
step onto more torch threads: where several replicas and shards share one machine's cores (moefleet
serve's local cluster once the autoscaler adds units), two replicas' wide steps stalled on each
other's threads, and first tokens waited for hundreds of milliseconds."""

import os
import resource
import time


def machine_busy_s() -> float | None:
    """CPU seconds this machine's cores have been busy since boot; None where /proc/stat is unreadable."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle and iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user .. steal (guest time is inside user)


def own_cpu_s(who: int = resource.RUSAGE_SELF) -> float:
    """User + system CPU seconds of this process (RUSAGE_CHILDREN: of its waited-for children)."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


class SpareCores:
    """Called, the whole cores the other processes did not keep busy over the last interval of at least
    `every_s` (sampled no more often, so a step pays for a sample rarely); `cores` until two samples exist
    or where the machine's busy time cannot be read. Whole cores: another process busy on a fraction of a
    core leaves it spare, one busy on a whole core does not."""

    def __init__(self, cores: int, every_s: float = 0.5, clock=time.monotonic, machine=machine_busy_s,
                 own=own_cpu_s):
        self.cores, self.every_s = cores, every_s
        self.clock, self.machine, self.own = clock, machine, own
        self.spare = cores
        self._sample = None  # (time, machine busy s, own CPU s)

    def __call__(self) -> int:
        now = self.clock()
        if self._sample is not None and now - self._sample[0] < self.every_s:
            return self.spare
        machine = self.machine()
        if machine is None:
            return self.cores
        sample = (now, machine, self.own())
        if self._sample is not None:
            (t0, m0, o0), (t1, m1, o1) = self._sample, sample
            others = max(0.0, (m1 - m0) - (o1 - o0)) / (t1 - t0)
            self.spare = max(0, self.cores - int(others))
        self._sample = sample
        return self.spare
