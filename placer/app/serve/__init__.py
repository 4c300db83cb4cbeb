"""``placer serve``: a long-running rebalancing service (README, "Rebalancing service").

It keeps an exponentially decayed window of routing load fed by ``POST /stats`` and by dump
files landing in a watched directory, re-solves in the background, and publishes a new
placement only when the simulator predicts a step-time gain larger than a threshold after the
migration cost (:mod:`placer.app.serve.policy`).
"""

from placer.app.serve.policy import Decision, PolicyConfig, evaluate, should_publish
from placer.app.serve.service import (
           PLACEMENT_FORMATS,
           TOKEN_ENV,
           ServeConfig,
           Service,
           is_local_host,
)
from placer.app.serve.state import (
           Observation,
           ServiceState,
           Window,
           load_state,
           parse_observation,
           save_state,
)

__all__ = ["PLACEMENT_FORMATS", "TOKEN_ENV", "Decision", "Observation", "PolicyConfig", "ServeConfig", "Service",
           "ServiceState", "Window", "evaluate", "is_local_host", "load_state", "parse_observation", "save_state",
           "should_publish"]
