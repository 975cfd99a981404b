"""The servable checkpoint's parts, one job per module; the public names are re-exported by
:mod:`personamoe.integrations.export` (the import path users and the vLLM plugin know).

- :mod:`.section`: the ``personamoe`` section of ``config.json`` (schema and validation);
- :mod:`.bank_view`: one target's bank tensors, validated against the section;
- :mod:`.writer`: :func:`~personamoe.integrations.export.export`;
- :mod:`.loader`: :func:`~personamoe.integrations.export.load_exported`;
- :mod:`.cli`: ``python -m personamoe export``.

vLLM-only checks (architectures, a local folder) live in ``personamoe.integrations.vllm.config``.
"""
