"""Load an exported checkpoint with ``transformers`` (:func:`load_exported`): the base model, its
bank (read once) and the routing options of the ``personamoe`` section."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from personamoe._json_file import read_json_object
from personamoe.integrations.checkpoint.bank_view import read_bank_tensors
from personamoe.integrations.checkpoint.section import (
    SECTION,
    ExportError,
    PersonaSection,
    read_section,
)

if TYPE_CHECKING:
    from personamoe.integrations.bank import BankFiles

__all__ = ["load_exported"]


def _check_bank(section: PersonaSection, meta: dict[str, Any], tensors: dict[str, Any]) -> None:
    """The section and the bank describe the same experts and targets; every target's tensors are
    well formed (and agree with a personamoe-export/1 section's repeated tables)."""
    cfg_file = section.path
    experts = tuple(meta.get("experts") or ())
    if experts != section.experts:
        raise ExportError(
            f"{cfg_file}: key '{SECTION}.experts': {list(section.experts)} disagrees with the "
            f"bank's experts {list(experts)}"
        )
    layers = set(meta.get("layers") or ())
    if layers != set(section.targets):
        raise ExportError(
            f"{cfg_file}: key '{SECTION}.targets' disagrees with the bank's layers "
            f"({sorted(layers ^ set(section.targets))[:3]} ...)"
        )
    saved = [p.get("name") if isinstance(p, dict) else None for p in meta.get("personas") or []]
    if sorted(map(str, saved)) != sorted(section.personas):
        raise ExportError(
            f"{cfg_file}: key '{SECTION}.personas': {list(section.personas)} disagrees with the "
            f"personas saved with the bank {saved}"
        )
    for t in section.targets:
        read_bank_tensors(section, t, tensors)


def load_exported(path: str | Path, **from_pretrained: Any) -> nn.Module:
    """The exported checkpoint as a ``transformers`` model with its persona bank injected
    (routing options from the ``personamoe`` section). Extra keyword arguments go to
    ``AutoModelForCausalLM.from_pretrained``."""
    from transformers import AutoModelForCausalLM

    from personamoe.integrations.bank import install_bank, read_bank

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file}: not found")
    config = read_json_object(cfg_file, ExportError)
    section = read_section(config, cfg_file)
    if not section.bank_file().is_file():
        raise ExportError(f"{cfg_file}: key '{SECTION}.bank': {section.bank_file()} not found")
    bank = read_bank(path, section.bank)  # the one read of the bank file
    _check_bank(section, bank.meta, bank.tensors)
    model = AutoModelForCausalLM.from_pretrained(str(path), **from_pretrained)
    install_bank(model, _with_section_routing(bank, section))
    if bank.meta["options"].get("calibration", "none") != section.calibration:
        # An edited section: the divisor the bank was saved with belongs to another mode.
        from personamoe.integrations.modes import set_routing

        set_routing(model, calibration=section.calibration)
    return model


def _with_section_routing(bank: BankFiles, section: PersonaSection) -> BankFiles:
    """The bank with the section's routing options in place of the ones it was saved with: the
    section is authoritative (editing it changes how a served model routes)."""
    calibrated = section.calibration in ("frobenius", "data")
    options = dict(bank.meta["options"], top_k=section.top_k, temperature=section.temperature,
                   normalize=section.normalize, calibration=section.calibration)  # fmt: skip
    layers = {name: dict(info, calibrated=calibrated) for name, info in bank.meta["layers"].items()}
    return replace(bank, meta=dict(bank.meta, options=options, layers=layers))
