"""The liveserve Serve application: Gateway -> Perception, Decision and Reaction, for each model served.

`build_app` is the application's import path in the Serve config (orchestration/serve_config.yaml); its
`args` are ServiceSettings, checked here so a typo fails the deploy with the setting's name. Each model
of the deployment (ServiceSettings.served_models) gets its own Decision and Reaction deployments, and a
Perception deployment unless it shares another model's; the default model's keep the plain names, so a
one-model deployment is unchanged. A commentary model (Qwen2.5-VL) has no Reaction deployment.
"""

from __future__ import annotations

from ray.serve import Application

from liveserve.services.deploy.deployments import (DecisionDeployment, GatewayDeployment, PerceptionDeployment,
                                            ReactionDeployment)
from liveserve.services.settings import ServiceSettings


def build_app(args: dict | None = None) -> Application:
    settings = ServiceSettings.from_dict(args)
    served = settings.served_models()
    perception = {model.perception_pool: PerceptionDeployment.options(name=model.perception_pool)
                  .bind(model.settings.to_dict()) for model in served if model.perception_of == model.name}
    # A commentary model (qwen2_5_vl) writes what it says on its Decision replicas: it has no Reaction pool.
    pools = {model.name: {"perception": perception[model.perception_pool],
                          "decision": DecisionDeployment.options(name=model.decision_pool).bind(model.settings.to_dict()),
                          "reaction": ReactionDeployment.options(name=model.reaction_pool).bind(model.settings.to_dict())
                          if model.family == "live" else None}
             for model in served}
    return GatewayDeployment.bind(pools, settings.to_dict())
