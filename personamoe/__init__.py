"""personamoe: fused kernels for persona mixture-of-experts (router-free top-k over LoRA adapters).

Importing compiles nothing and needs no GPU: extensions load lazily when a backend is first used.
"""

from personamoe import reference
from personamoe.adapters import AdapterError
from personamoe.backends import available_backends, get_backend, set_backend, use_backend
from personamoe.integrations import (
    export_expert,
    inject,
    load_bank,
    merge,
    routing_stats,
    save_bank,
    set_routing,
    unmerge,
)
from personamoe.integrations.calibrate import calibrate
from personamoe.integrations.model_personas import add_persona, remove_persona, use_personas
from personamoe.mix_op import persona_moe_mix_
from personamoe.nn import PersonaMoELinear
from personamoe.ops import persona_moe_linear
from personamoe.personas import Persona
from personamoe.reference import load_balancing_loss

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "Persona",
    "PersonaMoELinear",
    "__version__",
    "add_persona",
    "available_backends",
    "calibrate",
    "export_expert",
    "get_backend",
    "inject",
    "load_balancing_loss",
    "load_bank",
    "merge",
    "persona_moe_linear",
    "persona_moe_mix_",
    "reference",
    "remove_persona",
    "routing_stats",
    "save_bank",
    "set_backend",
    "set_routing",
    "unmerge",
    "use_backend",
    "use_personas",
]
