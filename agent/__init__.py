"""The wiremesh node agent: config, the planner, the reconcile loop, key rotation, services, metrics."""

__version__ = "0.1.0"

from .config import AgentConfig, load_config  # noqa: E402 - daemon imports __version__ from here
from .daemon import AGENT_NICE, Agent  # noqa: E402
from .identity import load_identity  # noqa: E402
from .policy_plan import identities_of  # noqa: E402
from .service_plan import admitted, certified_places  # noqa: E402
from .services import backends_of  # noqa: E402

__all__ = ["AGENT_NICE", "Agent", "AgentConfig", "__version__", "admitted", "backends_of", "certified_places",
           "identities_of", "load_config", "load_identity"]
