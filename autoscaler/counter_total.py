"""A running total over several sources' cumulative counters that may restart (pure), as Prometheus'
increase() reads a counter: a value lower than the last one means the source restarted from zero, so
all of it is new. The autoscaler sums the expert compute the shards report to each replica; a replica's
counters restart with each placement it switches to (a new transport), and replicas come and go. A
plain sum across a restart goes down, and a window's difference over it would read as no load at all
(the shard pool then looked idle right after it grew)."""


class CounterTotal:
    def __init__(self):
        self.total = 0.0
        self._last: dict[str, float] = {}

    def add(self, values: dict[str, float]) -> float:
        """The total after this reading of every source's counter (`values`: source -> cumulative value);
        a source read for the first time adds its whole value, a source no longer read is forgotten."""
        for source, value in values.items():
            before = self._last.get(source)
            self.total += value if before is None or value < before else value - before
        self._last = dict(values)
        return self.total
