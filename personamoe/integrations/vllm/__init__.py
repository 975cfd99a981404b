"""The vLLM plugin: serve a personamoe checkpoint (``python -m personamoe export``) with vLLM.

vLLM loads ``register`` in every one of its processes through the entry point group
``vllm.general_plugins`` (declared in ``pyproject.toml``). It replaces vLLM's linear layer classes
(``ReplicatedLinear``, ``ColumnParallelLinear``, ``RowParallelLinear``, ``QKVParallelLinear``,
``MergedColumnParallelLinear``) by out-of-tree subclasses (``register_oot``). A subclass behaves
exactly like vLLM's own layer unless the served model's ``config.json`` carries a ``personamoe``
section naming it as a target: then its ``quant_method`` becomes a :class:`PersonaLinearMethod`
(a subclass of vLLM's ``UnquantizedLinearMethod``) whose ``apply`` runs the persona mixture through
the personamoe custom op (``cpp`` backend on CPU, Triton/CUDA on GPU). Because the mixture lives in
``quant_method.apply``, vLLM's own LoRA wrappers (which call ``apply`` directly) add a LoRA request
on top of the mixture.

Supported: Llama-family decoder models (``LlamaForCausalLM``, ``Qwen2ForCausalLM``,
``MistralForCausalLM``), unquantized weights, token routing, tensor parallelism (the math of
``personamoe.integrations.tp``), and per-request personas (a request names one of the personas
saved with the export in ``SamplingParams.extra_args={"persona": name}``, online ``vllm_xargs``:
``personamoe.integrations.vllm.personas``).
"""

from __future__ import annotations

from personamoe.integrations.vllm.version import TESTED_VLLM, check_vllm_version

__all__ = ["TESTED_VLLM", "check_vllm_version", "register"]

_registered = False


def register() -> None:
    """The ``vllm.general_plugins`` entry point (idempotent; runs in every vLLM process)."""
    global _registered
    if _registered:
        return
    check_vllm_version()
    from personamoe.integrations.vllm.layers import register_layers

    register_layers()
    from personamoe.integrations.vllm.personas import install_frontend_hook

    install_frontend_hook()
    _registered = True
