"""Settings of the automatic-rebalance rule (autoscaler/rebalance_rule.py), a section of
ControllerConfig and of cluster.yaml."""

from pydantic import BaseModel, ConfigDict, Field

from moefleet.autoscaler.proactive_rebalance import ProactiveSettings


class AutoRebalance(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(False, description="Rebalance without being asked when the imbalance stays high.")
    threshold: float = Field(1.5, gt=1.0, description="Imbalance (max / mean shard load) that counts as high.")
    window_s: float = Field(30.0, gt=0, description="How long the imbalance must stay above the threshold.")
    cooldown_s: float = Field(60.0, ge=0, description="Least time between two automatic rebalances.")
    proactive: bool = Field(True, description="Also rebalance ahead of the load: when the expert load the affinity "
                                              "model predicts for the requests just admitted would push the "
                                              "imbalance above proactive_threshold (autoscaler/proactive_rebalance.py).")
    proactive_threshold: float = Field(1.2, gt=1.0, description="Forecast imbalance that triggers a proactive "
                                                                "rebalance.")
    proactive_cooldown_s: float = Field(10.0, ge=0, description="Least time from the last change to a proactive "
                                                                "rebalance (a forecast can tell sooner than the "
                                                                "observed load whether a change is needed).")
    proactive_check_s: float = Field(30.0, gt=0, description="How long a proactive rebalance is watched: the first "
                                                             "imbalance sample above proactive_threshold in that "
                                                             "time plans the placement again toward the observed "
                                                             "load, without waiting out window_s and cooldown_s "
                                                             "(once per proactive rebalance).")

    def proactive_settings(self) -> ProactiveSettings:
        """The proactive rule's settings (autoscaler/proactive_rebalance.py) from these."""
        return ProactiveSettings(threshold=self.proactive_threshold, cooldown_s=self.proactive_cooldown_s,
                                 check_s=self.proactive_check_s)
