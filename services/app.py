"""The liveserve Serve application: Gateway -> Perception, Decision and Reaction.

`build_app` is the application's import path in the Serve config (orchestration/serve_config.yaml); its
`args` are ServiceSettings, checked here so a typo fails the deploy with the setting's name.
"""

from __future__ import annotations

from ray.serve import Application

from liveserve.services.deployments import (DecisionDeployment, GatewayDeployment, PerceptionDeployment,
                                            ReactionDeployment)
from liveserve.services.settings import ServiceSettings


def build_app(args: dict | None = None) -> Application:
    settings = ServiceSettings.from_dict(args).to_dict()
    return GatewayDeployment.bind(PerceptionDeployment.bind(settings), DecisionDeployment.bind(settings),
                                  ReactionDeployment.bind(settings), settings)
