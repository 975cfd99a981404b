"""Model integrations: persona experts injected into Hugging Face ``transformers`` models."""

from personamoe.integrations.bank import export_expert, load_bank, save_bank
from personamoe.integrations.hf import inject
from personamoe.integrations.layers import PersonaConv1DLayer, PersonaLayer
from personamoe.integrations.modes import merge, set_routing, unmerge
from personamoe.integrations.stats import LayerRouting, RoutingStats, routing_stats

__all__ = [
    "LayerRouting",
    "PersonaConv1DLayer",
    "PersonaLayer",
    "RoutingStats",
    "export_expert",
    "inject",
    "load_bank",
    "merge",
    "routing_stats",
    "save_bank",
    "set_routing",
    "unmerge",
]
