"""LoRA extraction: the low-rank difference of a fine-tuned model from its base, as a PEFT
adapter.

For every 2-D weight ``M.weight`` that differs between `base` and `model`, the delta
``D = W_model - W_base`` is factored by a truncated SVD ``D ~= U_r S_r V_r^T`` and written
as PEFT's ``lora_B = U_r sqrt(S_r)`` (out, r) and ``lora_A = sqrt(S_r) V_r^T`` (r, in),
with ``lora_alpha = r`` per module (scale 1). Embeddings (a module whose name contains
``embed``, except ``embed_out``) are written as ``lora_embedding_A``/``lora_embedding_B``
of ``D^T``. The output loads with ``peft.PeftModel.from_pretrained(base, out)`` and is a
``base+adapter`` merge input.

The rank of a module is a fixed `rank` or, with `energy`, the smallest rank whose singular
values keep that fraction of ``||D||_F^2`` (capped at `max_rank`). The SVD is
:func:`fastmerge.twin.svd.truncated_svd`'s randomized one (a seeded range finder of
``rank + 10`` columns, 4 power iterations) on `device`, exact where the matrix is small.
With `energy`, the spectrum comes from a sketch of ``max_rank + 10`` columns and the total
energy ``||D||_F^2`` is computed exactly; the sketch's singular values never exceed D's (it
is a projection), so the chosen rank is never below the exact SVD's, and above it only
where the range finder misses part of the leading spectrum.

Streaming: the headers are checked first (same tensors, same shapes; ranks that fit),
then one pair of tensors at a time is read, factored and dropped; only the factors
(``r * (in + out)`` numbers per module) are kept until the adapter is written into a
staging directory beside `out` that is renamed into place at the end. Nothing is left
behind on failure.

Example:
    >>> import tempfile, torch, safetensors.torch
    >>> d = tempfile.mkdtemp()
    >>> w = torch.randn(8, 6)
    >>> safetensors.torch.save_file({"fc.weight": w}, f"{d}/base.safetensors")
    >>> delta = torch.randn(8, 1) @ torch.randn(1, 6)
    >>> safetensors.torch.save_file({"fc.weight": w + delta}, f"{d}/ft.safetensors")
    >>> report = extract_lora(f"{d}/base.safetensors", f"{d}/ft.safetensors", f"{d}/lora",
    ...                       rank=2, progress=False)
    >>> [(m.name, m.rank, m.error < 1e-5) for m in report.modules]
    [('fc', 2, True)]
"""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..io import Checkpoint, new_run_id, open_checkpoint
from ..io.publish import Staging
from ..io.writer import check_output_dir
from ..twin.svd import OVERSAMPLE, POWER_ITERATIONS, truncated_svd
from .adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PREFIX, LoraError

__all__ = ["ExtractionReport", "ModuleReport", "extract_lora", "is_embedding", "lora_factors"]

PathLike = Union[str, "os.PathLike[str]"]

#: Default cap of the rank an energy threshold may choose.
DEFAULT_MAX_RANK = 128


@dataclass(frozen=True)
class ModuleReport:
    """One extracted module: shape of its weight, rank, relative Frobenius error
    ``||D - B A||_F / ||D||_F`` of the written factors, and the fraction of
    ``||D||_F^2`` they keep.

    Example:
        >>> ModuleReport("fc", (8, 6), 2, 0.01, 0.9999).kind
        'linear'
    """

    name: str
    shape: tuple[int, ...]
    rank: int
    error: float
    energy: float
    kind: str = "linear"


@dataclass
class ExtractionReport:
    """What :func:`extract_lora` wrote: the modules, the tensors that differ but are left
    out (not 2-D weights of the selected modules; a warning names them), and the time.

    Example:
        >>> r = ExtractionReport(Path("out"), [ModuleReport("fc", (8, 6), 2, 0.25, 0.9)])
        >>> r.max_error, r.mean_error
        (0.25, 0.25)
    """

    out: Path
    modules: list[ModuleReport] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def max_error(self) -> float:
        """The largest relative reconstruction error of a module (0 when none)."""
        return max((m.error for m in self.modules), default=0.0)

    @property
    def mean_error(self) -> float:
        """The mean relative reconstruction error of the modules (0 when none)."""
        return sum(m.error for m in self.modules) / len(self.modules) if self.modules else 0.0

    def text(self) -> str:
        """One line per module (name, shape, rank, error), then a summary."""
        lines = [
            f"{m.name:60} {str(list(m.shape)):14} r={m.rank:<4} error={m.error:.3e}"
            for m in self.modules
        ]
        lines.append(
            f"{len(self.modules)} modules, mean relative error {self.mean_error:.3e}, max "
            f"{self.max_error:.3e}, {self.seconds:.1f} s -> {self.out}"
        )
        if self.skipped:
            lines.append(
                f"differ but left out (not 2-D weights of the selected modules): "
                f"{', '.join(self.skipped)}"
            )
        return "\n".join(lines)


def is_embedding(name: str) -> bool:
    """Whether the 2-D weight `name` is an embedding's (its module's name contains
    ``embed``, other than GPT-NeoX's output ``embed_out``).

    Example:
        >>> is_embedding("model.embed_tokens.weight"), is_embedding("lm_head.weight")
        (True, False)
    """
    module = name.removesuffix(".weight").rsplit(".", 1)[-1]
    return "embed" in module and module != "embed_out"


def lora_factors(
    delta: torch.Tensor,
    rank: Optional[int] = None,
    *,
    energy: Optional[float] = None,
    max_rank: int = DEFAULT_MAX_RANK,
    method: str = "randomized",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """PEFT factors ``(A, B)`` of a 2-D `delta` with ``B @ A ~= delta`` at a fixed `rank`
    or the smallest rank keeping `energy` of ``||delta||_F^2`` (at most `max_rank`), and
    the fraction of ``||delta||_F^2`` kept. `method` is :func:`truncated_svd`'s (the
    randomized SVD falls back to the exact one where the sketch would not be smaller).

    Example:
        >>> d = torch.outer(torch.arange(1.0, 5.0), torch.ones(3))
        >>> a, b, kept = lora_factors(d, 1)
        >>> a.shape, b.shape, torch.allclose(b @ a, d), round(kept, 6)
        (torch.Size([1, 3]), torch.Size([4, 1]), True, 1.0)
    """
    work = delta.to(torch.float64 if delta.dtype == torch.float64 else torch.float32)
    full = min(work.shape)
    total = float(work.double().square().sum())
    width = rank if energy is None else min(max_rank, full)
    if method == "randomized" and 2 * (width + OVERSAMPLE) > full:
        method = "exact"
    f = truncated_svd(work, width, method=method, power_iterations=POWER_ITERATIONS, seed=seed)
    kept_curve = f.s.double().square().cumsum(0)
    if energy is not None:
        target = energy * total
        hit = int(torch.searchsorted(kept_curve, torch.tensor(target, dtype=torch.float64)))
        width = max(1, min(hit + 1, width))
    root = f.s[:width].sqrt()
    b = f.u[:, :width] * root
    a = root[:, None] * f.vh[:width]
    kept = float(kept_curve[width - 1]) / total if total > 0 and width else 1.0
    return a, b, min(kept, 1.0)


def _plan(
    base: Checkpoint,
    model: Checkpoint,
    modules: Optional[str],
    rank: Optional[int],
    base_path: Path,
    model_path: Path,
) -> list[str]:
    """The candidate 2-D weights, after checking both models' headers."""
    extra = next((n for n in model if n not in base), None)
    if extra is not None:
        raise LoraError(
            f"{model_path}: tensor {extra!r} is not in the base model {base_path} "
            "(models of different architectures?)"
        )
    missing = next((n for n in base if n not in model), None)
    if missing is not None:
        raise LoraError(
            f"{model_path}: no tensor {missing!r} (it is in the base model "
            f"{base_path}; models of different architectures?)"
        )
    pattern = None
    if modules is not None:
        try:
            pattern = re.compile(modules)
        except re.error as exc:
            raise LoraError(f"--modules {modules!r}: not a regular expression ({exc})") from None
    names = []
    for name in model:
        a, b = base.info(name), model.info(name)
        if a.shape != b.shape:
            raise LoraError(
                f"{model_path}: tensor {name!r} is {list(b.shape)} but "
                f"{list(a.shape)} in the base model {base_path} (models of "
                "different architectures?)"
            )
        if len(a.shape) != 2 or not name.endswith(".weight") or not b.dtype.is_floating_point:
            continue
        module = name.removesuffix(".weight")
        if pattern is not None and not pattern.search(module):
            continue
        if rank is not None and rank > min(a.shape):
            raise LoraError(
                f"module {module!r}: rank {rank} is larger than its weight "
                f"{list(a.shape)} allows (at most {min(a.shape)}); lower --rank "
                "or leave the module out with --modules"
            )
        names.append(name)
    if pattern is not None and not names:
        raise LoraError(f"--modules {modules!r} matches no 2-D weight of {model_path}")
    return names


def _check_configs(base_path: Path, model_path: Path) -> None:
    """Refuse two models whose config.json say different architectures."""

    def read(p: Path) -> dict[str, Any]:
        f = p / "config.json" if p.is_dir() else p.parent / "config.json"
        try:
            return json.loads(f.read_text()) if f.is_file() else {}
        except (OSError, ValueError):
            return {}

    a, b = read(base_path), read(model_path)
    for key in ("model_type", "architectures"):
        if key in a and key in b and a[key] != b[key]:
            raise LoraError(
                f"{model_path}: {key} {b[key]!r} differs from the base model's "
                f"{a[key]!r} ({base_path}); models of different architectures"
            )


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="extracting LoRA", unit="tensor")


def extract_lora(
    base: PathLike,
    model: PathLike,
    out: PathLike,
    *,
    rank: Optional[int] = None,
    energy: Optional[float] = None,
    max_rank: int = DEFAULT_MAX_RANK,
    modules: Optional[str] = None,
    device: Union[str, torch.device] = "cpu",
    seed: int = 0,
    method: str = "randomized",
    overwrite: bool = False,
    progress: bool = True,
) -> ExtractionReport:
    """Write the PEFT LoRA adapter of ``model - base`` to the directory `out`.

    Args:
        base, model: checkpoints of one architecture (Hugging Face directories, sharded or
            not, or ``.safetensors`` files).
        rank: the rank of every module (default 16 when `energy` is not given).
        energy: instead of `rank`, keep this fraction in (0, 1] of each delta's squared
            Frobenius norm with the smallest rank that does, at most `max_rank`.
        modules: a regular expression searched in module names (``model.layers.0.mlp.
            up_proj``); default: every 2-D weight that differs.
        device: where the SVDs run (``"cpu"``, ``"cuda"``); tensors are read on the CPU.
        method: ``"randomized"`` (default) or ``"exact"`` (``torch.linalg.svd``).
        overwrite: replace an existing `out`.

    Raises:
        LoraError: models with different tensors or shapes (naming the tensor), a rank
            larger than a module (naming it), a bad `modules` pattern or `energy`.
        CheckpointError: a missing or corrupt checkpoint, an existing `out`.

    Example:
        >>> import tempfile, safetensors.torch
        >>> d = tempfile.mkdtemp()
        >>> safetensors.torch.save_file({"fc.weight": torch.zeros(4, 3)}, f"{d}/b.safetensors")
        >>> extract_lora(f"{d}/b.safetensors", f"{d}/b.safetensors", f"{d}/out", rank=8)
        Traceback (most recent call last):
        ...
        fastmerge.lora.adapter.LoraError: module 'fc': rank 8 is larger than its weight [4, 3] ...
    """
    start = time.perf_counter()
    rank = _check_choice(rank, energy, max_rank)
    out_dir = check_output_dir(out, overwrite)
    base_path, model_path = Path(base), Path(model)
    _check_configs(base_path, model_path)
    device = torch.device(device)
    b_ckpt, m_ckpt = open_checkpoint(base_path), open_checkpoint(model_path)
    try:
        names = _plan(b_ckpt, m_ckpt, modules, rank, base_path, model_path)
        report = ExtractionReport(out_dir)
        tensors: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        bar = _progress(len(m_ckpt), progress)
        candidates = set(names)
        order = sorted(m_ckpt, key=lambda n: (m_ckpt.file_of(n), m_ckpt.info(n).begin))
        for name in order:
            w_model, w_base = m_ckpt[name], b_ckpt[name]
            if name not in candidates:
                if w_model.dtype.is_floating_point and not torch.equal(w_model, w_base):
                    report.skipped.append(name)
            elif not torch.equal(w_model, w_base):
                m = _extract_one(
                    name,
                    w_base,
                    w_model,
                    tensors,
                    rank=rank,
                    energy=energy,
                    max_rank=max_rank,
                    method=method,
                    seed=seed,
                    device=device,
                )
                report.modules.append(m)
                ranks[m.name] = m.rank
            del w_model, w_base
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    finally:
        b_ckpt.close()
        m_ckpt.close()
    if not report.modules:
        raise LoraError(
            f"{model_path}: no 2-D weight differs from the base model {base_path}"
            "; there is nothing to extract"
        )
    if report.skipped:
        shown = ", ".join(report.skipped[:5]) + (" ..." if len(report.skipped) > 5 else "")
        warnings.warn(
            f"{len(report.skipped)} tensors differ but are not 2-D weights of the "
            f"selected modules, so the adapter leaves them out: {shown}",
            stacklevel=2,
        )
    _write(out_dir, tensors, adapter_config(base_path, ranks), overwrite)
    report.seconds = time.perf_counter() - start
    return report


def _check_choice(rank: Optional[int], energy: Optional[float], max_rank: int) -> Optional[int]:
    if rank is not None and energy is not None:
        raise LoraError("give a rank or an energy threshold, not both")
    if energy is not None:
        if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1:
            raise LoraError(f"energy must be a fraction in (0, 1], got {energy!r}")
        if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
            raise LoraError(f"max_rank must be an int >= 1, got {max_rank!r}")
        return None
    rank = 16 if rank is None else rank
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LoraError(f"rank must be an int >= 1, got {rank!r}")
    return rank


def _extract_one(
    name: str,
    w_base: torch.Tensor,
    w_model: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    *,
    rank,
    energy,
    max_rank,
    method,
    seed,
    device,
) -> ModuleReport:
    module = name.removesuffix(".weight")
    embedding = is_embedding(name)
    delta = w_model.to(device, torch.float32) - w_base.to(device, torch.float32)
    if embedding:
        delta = delta.T
    a, b, kept = lora_factors(
        delta, rank, energy=energy, max_rank=max_rank, method=method, seed=seed
    )
    a, b = a.to(w_model.dtype), b.to(w_model.dtype)
    error = float(
        torch.linalg.norm(delta - b.float() @ a.float()) / torch.linalg.norm(delta).clamp_min(1e-30)
    )
    if embedding:
        tensors[f"{PREFIX}{module}.lora_embedding_A"] = a.cpu().contiguous()
        tensors[f"{PREFIX}{module}.lora_embedding_B"] = b.cpu().contiguous()
    else:
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a.cpu().contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = b.cpu().contiguous()
    kind = "embedding" if embedding else "linear"
    return ModuleReport(module, tuple(w_model.shape), a.shape[0], error, kept, kind)


def adapter_config(base: PathLike, ranks: dict[str, int]) -> dict[str, Any]:
    """The ``adapter_config.json`` of modules with the given ranks: ``r`` the largest,
    the others in ``rank_pattern``, ``lora_alpha`` equal to the rank everywhere (scale 1),
    ``target_modules`` the modules' full names.

    Example:
        >>> c = adapter_config("base", {"a.q": 4, "a.k": 2})
        >>> c["r"], c["rank_pattern"], c["alpha_pattern"], c["target_modules"]
        (4, {'a.k': 2}, {'a.k': 2}, ['a.q', 'a.k'])
    """
    top = max(ranks.values())
    other = {k: v for k, v in ranks.items() if v != top}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": top,
        "lora_alpha": top,
        "rank_pattern": other,
        "alpha_pattern": dict(other),
        "target_modules": list(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }


def _write(
    out: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any], overwrite: bool
) -> None:
    """The adapter files, staged beside `out` and renamed into place."""
    from safetensors.torch import save_file

    stage = Staging(out, new_run_id())
    try:
        save_file(tensors, str(stage.tmp_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (stage.tmp_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        stage.publish(overwrite)
    except BaseException:
        stage.remove()
        raise
