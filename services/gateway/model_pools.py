"""One served model as a gateway reaches it: its settings and session defaults, its three pools (through
one transport, seams.py), and this gateway's links to the replicas of its Decision and Reaction pools.

A deployment may serve several models (ServiceSettings.served_models); each session belongs to one, and
every hop of the session goes to that model's pools. Models with the same vision tower share a Perception
pool, and then the gateway's frame batcher for it (one call encodes both models' frames).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from liveserve.api.v1 import live_stream_pb2 as pb
from liveserve.engine.sessions import MODES_BY_FAMILY
from liveserve.services.gateway.links import FrameBatcher, ReplicaLink
from liveserve.services.wire.seams import Decision, Perception, Reaction
from liveserve.services.settings import ServedModel


@dataclass(frozen=True, slots=True)
class PoolSeams:
    """A served model and its pools through one transport (seams.py): what a Gateway is built from."""

    model: ServedModel
    perception: Perception
    decision: Decision
    reaction: Reaction | None  # None: a commentary model (Decision writes what it says)


class ModelPools:
    def __init__(self, seams: PoolSeams, *,
                 make_link: Callable[[ModelPools, str, str], ReplicaLink],
                 batcher: Callable[[ModelPools], FrameBatcher]) -> None:
        """`make_link(pools, pool, replica)`: a new link to `replica` of `pool` ("decision" or "reaction");
        `batcher(pools)`: the gateway's frame batcher for this model's Perception pool."""
        served = seams.model
        self.served, self.name, self.settings = served, served.name, served.settings
        self.perception, self.decision, self.reaction = seams.perception, seams.decision, seams.reaction
        self.defaults = replace(served.settings.session_defaults(), mode=MODES_BY_FAMILY[served.family][0])
        self.modes = MODES_BY_FAMILY[served.family]  # the session modes its family has
        # One checkpoint decides and replies: Reaction's token ids are valid in Decision's cache as they are.
        self.shared_tokenizer = served.settings.reaction_model in ("", served.settings.model)
        self.links: dict[str, dict[str, ReplicaLink]] = {"decision": {}, "reaction": {}}
        self.open_sessions = 0  # this gateway's open calls of this model
        self._make_link, self._batcher = make_link, batcher

    @property
    def batcher(self) -> FrameBatcher:
        return self._batcher(self)

    def decision_link(self, replica: str) -> ReplicaLink:
        return self._link("decision", replica)

    def reaction_link(self, replica: str) -> ReplicaLink:
        return self._link("reaction", replica)

    def _link(self, pool: str, replica: str) -> ReplicaLink:
        """This gateway's link to `replica` of this model's `pool`, made on first use."""
        links = self.links[pool]
        link = links.get(replica)
        if link is None:
            link = links[replica] = self._make_link(self, pool, replica)
        return link

    def forget(self, link: ReplicaLink) -> None:
        """`link` failed: the next use of its replica makes a new one."""
        links = self.links[link.name]
        if links.get(link.replica) is link:
            del links[link.replica]

    def info(self, is_default: bool) -> pb.ModelInfo:
        """The model as ListModels describes it."""
        defaults = self.defaults
        return pb.ModelInfo(name=self.name, is_default=is_default, family=self.served.family,
                            threshold=defaults.threshold, max_new_tokens=defaults.max_new_tokens,
                            cache_policy=defaults.cache.policy, window_frames=defaults.cache.window_frames,
                            mode=defaults.mode)

    def pools(self) -> dict[str, object]:
        """Its pools by deployment name (what readiness checks report)."""
        pools = {self.served.perception_pool: self.perception, self.served.decision_pool: self.decision,
                 self.served.reaction_pool: self.reaction}
        return {name: pool for name, pool in pools.items() if pool is not None}

    def close(self) -> None:
        for links in self.links.values():
            for link in links.values():
                link.close()
