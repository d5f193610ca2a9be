from moefleet.cluster.engine.spare_cores import SpareCores, machine_busy_s, own_cpu_s


class Readings:
    """A fake clock and counters: each tick moves time by 1 s, others' busy and own CPU by the given seconds."""

    def __init__(self):
        self.t = self.machine = self.own_s = 0.0

    def tick(self, others: float, own: float = 0.0):
        self.t += 1.0
        self.machine += others + own
        self.own_s += own


def test_whole_cores_kept_busy_by_other_processes_are_not_spare():
    r = Readings()
    spare = SpareCores(2, every_s=0.5, clock=lambda: r.t, machine=lambda: r.machine, own=lambda: r.own_s)
    assert spare() == 2  # one sample: nothing to go on yet
    r.tick(others=0.8, own=1.0)  # a gateway and a client on most of a core: still both cores to widen onto
    assert spare() == 2
    r.tick(others=1.3, own=0.9)  # another replica stepping: one core is theirs
    assert spare() == 1
    r.tick(others=2.0, own=0.0)
    assert spare() == 0
    r.t += 0.2  # sampled again only after every_s
    r.machine += 10
    assert spare() == 0


def test_all_cores_where_the_machine_cannot_be_read():
    assert SpareCores(4, machine=lambda: None)() == 4


def test_this_machines_counters_move():
    busy, own = machine_busy_s(), own_cpu_s()
    sum(i * i for i in range(200_000))
    assert machine_busy_s() >= busy and own_cpu_s() > own
