"""What an admission answers when the load cannot go now but will: `MustWait`, the ModelsBusy it
carries (what is short, and which busy models the load waits for), and what evicting models
would free. Pure: built from a policy snapshot, read by the supervisor and the router's lanes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..policies import AdmissionRequest, Snapshot, shortfall
from .errors import ModelsBusy
from .loading import worst_shortfall


@dataclass(frozen=True)
class MustWait:
    """The load would fit once busy models finish their requests: the policy queued it.
    `blockers` are the models whose eviction would make room (the router drains them)."""

    error: ModelsBusy

    @property
    def blockers(self) -> tuple[str, ...]:
        return self.error.blockers

    def after(self, earlier: str) -> "MustWait":
        """The same wait, its reason led by what the earlier attempts of the load said."""
        return MustWait(dataclasses.replace(self.error, reason=f"{earlier}; then: {self.error.reason}"))


def must_wait(request: AdmissionRequest, snapshot: Snapshot, reason: str, blockers: tuple[str, ...]) -> MustWait:
    return MustWait(ModelsBusy(request.model, *worst_shortfall(snapshot.devices, shortfall(request, snapshot)),
                               f"{reason}; it loads once {', '.join(blockers) or 'they'} finish their requests",
                               blockers=blockers))


def freed_by(snapshot: Snapshot, victims: tuple[str, ...]) -> dict[str, int]:
    """Bytes per device the victims hold: what their eviction would free."""
    freed: dict[str, int] = {}
    for name in victims:
        for device, b in snapshot.models[name].held_bytes.items():
            freed[device] = freed.get(device, 0) + b
    return freed
