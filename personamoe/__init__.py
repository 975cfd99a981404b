"""personamoe: fused kernels for persona mixture-of-experts (router-free top-k over LoRA adapters).

Importing compiles nothing and needs no GPU: extensions load lazily when a backend is first used.
"""

from personamoe import reference
from personamoe.backends import available_backends, get_backend, set_backend, use_backend
from personamoe.nn import PersonaMoELinear
from personamoe.ops import persona_moe_linear
from personamoe.reference import load_balancing_loss

__version__ = "0.1.0"

__all__ = [
    "PersonaMoELinear",
    "__version__",
    "available_backends",
    "get_backend",
    "load_balancing_loss",
    "persona_moe_linear",
    "reference",
    "set_backend",
    "use_backend",
]
