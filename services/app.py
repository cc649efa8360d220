"""The liveserve Serve application: Gateway -> Perception and Decision -> Reaction.

`build_app` is the application's import path in the Serve config (orchestration/serve_config.yaml); its
`args` are ServiceSettings, checked here so a typo fails the deploy with the setting's name.
"""

from __future__ import annotations

from ray.serve import Application

from liveserve.services.decision import Decision
from liveserve.services.gateway import Gateway
from liveserve.services.perception import Perception
from liveserve.services.reaction import Reaction
from liveserve.services.settings import ServiceSettings


def build_app(args: dict | None = None) -> Application:
    settings = ServiceSettings.from_dict(args).to_dict()
    reaction = Reaction.bind(settings)
    decision = Decision.bind(reaction, settings)
    return Gateway.bind(Perception.bind(settings), decision, settings)
