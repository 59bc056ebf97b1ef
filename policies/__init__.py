"""Admission and eviction policies: pure functions over a ledger snapshot, picked by name from a
closed registry (an unknown name fails config validation and lists the valid ones)."""

from .eviction import Policy, fit, lru_idle, priority, shortfall, shrink_to_cover
from .snapshot import AdmissionRequest, Admit, Decision, DeviceBudget, Evict, ModelView, Queue, Rejected, Snapshot
from .value import Value

POLICIES: dict[str, Policy] = {"fit": fit, "lru_idle": lru_idle, "priority": priority, "value": Value()}

__all__ = ["POLICIES", "Policy", "Value", "fit", "lru_idle", "priority", "shortfall", "shrink_to_cover", "Admit",
           "AdmissionRequest", "Decision", "DeviceBudget", "Evict", "ModelView", "Queue", "Rejected", "Snapshot"]
