"""The controller's speculative-scheduling gauges as Prometheus families, beside the replicas' own
in a gateway's /metrics: how well the affinity model predicts routing, and what the placement and
request shuffling achieve (measured on the replicas' sampled routing, decayed over recent samples;
see cluster/control/speculation.py). A gauge with nothing measured yet is left out."""

from prometheus_client.core import GaugeMetricFamily, Metric

GAUGES = {
    "precision": ("moefleet_prediction_precision",
                  "Share of the affinity model's predicted top-k experts the router then chose."),
    "predicted_local_fraction": ("moefleet_predicted_local_fraction",
                                 "Share of predicted expert activations on a shard of the token's own node."),
    "actual_local_fraction": ("moefleet_actual_local_fraction",
                              "Share of actual expert activations served on a shard of the token's own node."),
    "fanout": ("moefleet_expert_fanout", "Distinct shards a token's experts lay on, per MoE layer (sampled)."),
    "cross_node_bytes_per_token": ("moefleet_cross_node_bytes_per_token",
                                   "Bytes a token's hidden states cross nodes, out and back, over all MoE layers."),
}


def speculation_families(gauges: dict[str, float | None]) -> list[Metric]:
    families = []
    for key, (name, help_text) in GAUGES.items():
        if gauges.get(key) is not None:
            family = GaugeMetricFamily(name, help_text)
            family.add_metric([], gauges[key])
            families.append(family)
    return families
