"""One Prometheus exposition for all the replicas behind a gateway: each replica's text is parsed,
its samples labelled with the replica, and families of the same name merged, so each family's
HELP and TYPE appear once however many replicas there are; and one histogram read back from it,
replica by replica."""

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector


class _Families(Collector):
    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def merge_replica_metrics(texts: dict[str, str], extra: list[Metric] = ()) -> str:
    """texts: replica id -> that replica's exposition (Prometheus text format); `extra`: families
    of the deployment as a whole (the controller's), added as they are."""
    families: dict[str, Metric] = {}
    for replica, text in texts.items():
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                             family.unit))
            merged.samples += [sample._replace(labels={**sample.labels, "replica": replica})
                               for sample in family.samples]
    registry = CollectorRegistry()
    registry.register(_Families([*families.values(), *extra]))
    return generate_latest(registry).decode()


def replica_histograms(text: str, name: str) -> dict[str, tuple[dict[float, float], float, float]]:
    """From a gateway's exposition (`merge_replica_metrics`' text): replica -> (cumulative count by bucket bound,
    +Inf included; sum; count) of histogram `name`."""
    histograms: dict[str, tuple[dict[float, float], list[float]]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            buckets, totals = histograms.setdefault(sample.labels.get("replica", ""), ({}, [0.0, 0.0]))
            if sample.name.endswith("_bucket"):
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
            elif sample.name.endswith("_sum"):
                totals[0] += sample.value
            elif sample.name.endswith("_count"):
                totals[1] += sample.value
    return {replica: (buckets, total, count) for replica, (buckets, (total, count)) in histograms.items()}
