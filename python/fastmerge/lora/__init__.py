"""LoRA adapters: extraction from a fine-tuned model, and adapters as merge inputs.

* :func:`extract_lora` writes the PEFT adapter (``adapter_config.json`` +
  ``adapter_model.safetensors``) of the low-rank part of ``model - base``, one tensor at a
  time, with a fixed rank or per-module ranks from an energy threshold (``fastmerge
  extract-lora`` on the command line).
* :func:`load_adapter` reads and validates a PEFT LoRA adapter; :func:`adapt_checkpoint`
  merges it lazily into a base checkpoint (``model: base+adapter`` in a merge
  configuration).

Example:
    >>> import tempfile, torch, safetensors.torch
    >>> d = tempfile.mkdtemp()
    >>> w = torch.randn(8, 6)
    >>> safetensors.torch.save_file({"fc.weight": w}, f"{d}/base.safetensors")
    >>> delta = torch.randn(8, 2) @ torch.randn(2, 6)
    >>> safetensors.torch.save_file({"fc.weight": w + delta}, f"{d}/ft.safetensors")
    >>> _ = extract_lora(f"{d}/base.safetensors", f"{d}/ft.safetensors", f"{d}/lora", rank=2,
    ...                  progress=False)
    >>> torch.allclose(load_adapter(f"{d}/lora").delta("fc"), delta, atol=1e-4)
    True
"""

from .adapter import (
    AdaptedCheckpoint,
    LoraAdapter,
    LoraError,
    LoraModule,
    adapt_checkpoint,
    load_adapter,
)
from .extract import ExtractionReport, ModuleReport, extract_lora, lora_factors

__all__ = [
    "AdaptedCheckpoint",
    "ExtractionReport",
    "LoraAdapter",
    "LoraError",
    "LoraModule",
    "ModuleReport",
    "adapt_checkpoint",
    "extract_lora",
    "load_adapter",
    "lora_factors",
]
