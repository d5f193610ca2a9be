"""The controller's gauges of the deployment as a whole, as Prometheus families beside the
replicas' own in a gateway's /metrics:
- speculative scheduling: how well the affinity model predicts routing, and what placement and
  request shuffling achieve (measured on the replicas' sampled routing, decayed over recent
  samples; cluster/control/speculation.py);
- the autoscaler: desired and actual size of each pool (replicas, expert shards).
A gauge with nothing measured yet is left out."""

from prometheus_client.core import GaugeMetricFamily, Metric

SPECULATION_GAUGES = {
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


def deployment_families(gauges: dict) -> list[Metric]:
    """gauges: Controller.deployment_gauges() ({} when the controller did not answer)."""
    families = []
    for key, (name, help_text) in SPECULATION_GAUGES.items():
        value = (gauges.get("speculation") or {}).get(key)
        if value is not None:
            family = GaugeMetricFamily(name, help_text)
            family.add_metric([], value)
            families.append(family)
    pools = gauges.get("pools")
    if pools:
        for kind in ("desired", "actual"):
            family = GaugeMetricFamily(f"moefleet_autoscaler_{kind}_size",
                                       f"The {kind} size of each pool (the autoscaler's).", labels=["pool"])
            for pool, size in pools[kind].items():
                family.add_metric([pool], size)
            families.append(family)
    return families
