"""A servable checkpoint: one folder with the base model, the persona bank and a ``personamoe``
section in ``config.json``, loaded by ``transformers`` + personamoe (:func:`load_exported`) and by
vLLM with the personamoe plugin (``personamoe.integrations.vllm``).

Layout of the folder (:func:`export`)::

    config.json                    the base model's config + a "personamoe" section (below)
    model.safetensors ...          the base weights, unchanged names (transformers' save_pretrained)
    model.safetensors.index.json   names the base weight files (so vLLM leaves the bank out)
    tokenizer files                copied from the base folder
    personamoe_bank.safetensors    the bank: every target layer's A, B, scalings, ranks
    personamoe_bank.json           its metadata (personamoe.load_bank reads the folder too)

The bank files are described once, in :mod:`personamoe.integrations.bank_format`; they are the
only source of ranks and scalings. The ``personamoe`` section holds the rest (``FORMAT``)::

    "personamoe": {
      "format": "personamoe-export/2",
      "bank": "personamoe_bank.safetensors",
      "experts": ["calm", "curious", ...],               E unique names, in bank order
      "targets": ["model.layers.0.self_attn.q_proj", ...],
      "top_k": 2, "normalize": "topk", "temperature": 1.0,
      "calibration": "none" | "frobenius",
      "routing": "token"
    }

The section is authoritative for routing: both loaders read ``top_k``/``normalize``/
``temperature`` from it (editing it changes the routing of a served model). Sections written as
``personamoe-export/1`` also carry ``ranks`` and ``scalings`` tables; they still load, and are
checked once against the bank.

Its parts live in :mod:`personamoe.integrations.checkpoint`, one job per module (section schema,
bank view, writer, loader, command line); this module is their one public import path.
"""

from __future__ import annotations

from personamoe.integrations.bank_format import BANK_WEIGHTS
from personamoe.integrations.checkpoint.bank_view import read_bank_tensors
from personamoe.integrations.checkpoint.cli import CLI_HELP, add_arguments, main
from personamoe.integrations.checkpoint.loader import load_exported
from personamoe.integrations.checkpoint.section import (
    FORMAT,
    LEGACY_FORMAT,
    SECTION,
    ExportError,
    PersonaSection,
    read_section,
)
from personamoe.integrations.checkpoint.writer import export

__all__ = [
    "BANK_WEIGHTS",
    "CLI_HELP",
    "FORMAT",
    "LEGACY_FORMAT",
    "SECTION",
    "ExportError",
    "PersonaSection",
    "add_arguments",
    "export",
    "load_exported",
    "main",
    "read_bank_tensors",
    "read_section",
]
