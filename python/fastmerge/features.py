"""Mergeable feature statistics for matching the units of two models (PLeaS, ZipIt).

:class:`FeatureStats` streams over batches of paired activations and keeps only
O((d_a + d_b)^2) float64 numbers, never the activations, from which every cost matrix
that unit matching needs (correlation, covariance, inner product, negative squared
distance) follows in one fused pass (:func:`fastmerge.ops.feature_cost`).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch

from . import dist
from ._dtypes import KERNEL_DTYPE_CODES, dtype_names
from ._tensors import TensorLike, as_tensor
from .ops.feature_center import feature_center
from .ops.feature_cost import KINDS, feature_cost

#: Elements of the centred workspace (both models' units) per step, by device type:
#: the GEMMs run on blocks of this many elements, so memory stays O(d), not O(N d).
CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}
#: With full=True, the Gram matrix of the concatenated units is computed in blocks of at
#: most this many units, upper triangle only (the rest is its transpose).
FULL_SEGMENT_UNITS = {"cpu": 512, "cuda": 2048}
#: float32 GEMM sums are moved into the float64 accumulators at least this often (rows).
FLUSH_ROWS = 1 << 15

#: The kind code that fastmerge.dist compares across the ranks before a reduction.
_REDUCTION_KIND = dist.kind_code("FeatureStats")


class FeatureStats:
    """Sufficient statistics of paired activations for feature-matching costs.

    Feed batches with :meth:`update`: ``xa`` of shape (N, d_a) from model a and ``xb``
    of shape (N, d_b) from model b, the same N samples (inputs) for both. Activations
    with more dimensions, (N, C, H, W, ...), are N*H*W*... samples of C units (channels
    at dim 1; reshape (N, L, d) transformer activations to (N*L, d) yourself). Batches
    may differ in size, dtype (float16, bfloat16, float32, float64) and count.

    Every cost is a per-sample mean over all samples seen, returned as a float64 tensor
    on the accumulators' device, of shape (d_a, d_b), or (d_a + d_b, d_a + d_b) with
    ``full=True`` (rows and columns: a's units, then b's; the within-model blocks are what
    ZipIt-style matching needs):

    * :meth:`covariance`: ``E[(a_i - mu_i)(b_j - nu_j)]`` (population);
    * :meth:`correlation`: covariance / (sigma_i sigma_j), 0 for a constant unit;
    * :meth:`inner_product`: ``E[a_i b_j]``;
    * :meth:`neg_sq_distance`: ``-E[(a_i - b_j)^2]``, the PLeaS default.

    How: each unit is shifted by the float32-rounded mean of the first batch's first
    block of rows (kept in ``shift_a``/``shift_b``), so that nothing cancels when
    |mean| >> std. Per block of rows (2**22 elements of both models' units on the CPU),
    one fused pass writes ``x - shift`` in the GEMM dtype (float32; float64 if a batch is
    float64) and adds float64 per-unit sums and sums of squares; then one GEMM
    ``(xa - sa)^T (xb - sb)`` runs on torch's BLAS or cuBLAS and is added to float64
    accumulators (float32 GEMM sums are moved there at least every 32,768 rows). With
    ``full=True`` the GEMMs cover the upper block triangle of ``X^T X`` for
    ``X = [xa - sa | xb - sb]`` in blocks of at most 512 units on the CPU (62.5% of the
    full product at d_a = d_b = 1024); the rest is its transpose. On CUDA the GEMM follows
    torch's float32 matmul precision: leave ``torch.backends.cuda.matmul.allow_tf32`` off
    for full float32 accuracy.

    Partial statistics merge exactly (:meth:`merge`), whatever their shifts: use one
    FeatureStats per thread, data shard or torch.distributed rank (gather their
    :meth:`state_dict` s), and merge them. One FeatureStats is not thread-safe.

    Args:
        full: also accumulate the within-model blocks, so that costs can be asked for
            the whole (d_a + d_b) square matrix.
        backend: backend of the fused kernels (see :mod:`fastmerge.backends`); default:
            the fastest usable one for the activations' device.

    Example:
        >>> import torch, fastmerge
        >>> xa = torch.randn(1000, 8, dtype=torch.float64)
        >>> xb = torch.cat([xa[:, :3], -xa[:, 3:]], dim=1)  # b's units: a's, sign-flipped
        >>> stats = fastmerge.FeatureStats()
        >>> for batch in range(0, 1000, 300):  # uneven batches stream in
        ...     _ = stats.update(xa[batch:batch + 300], xb[batch:batch + 300])
        >>> corr = stats.correlation()
        >>> corr.shape, corr.diagonal().round().tolist()
        (torch.Size([8, 8]), [1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0, -1.0])
    """

    def __init__(self, full: bool = False, *, backend: Optional[str] = None) -> None:
        self.full = bool(full)
        self.backend = backend
        self.count = 0
        self.shift_a: Optional[torch.Tensor] = None
        self.shift_b: Optional[torch.Tensor] = None
        self.sum_a: Optional[torch.Tensor] = None
        self.sum_b: Optional[torch.Tensor] = None
        self.sumsq_a: Optional[torch.Tensor] = None
        self.sumsq_b: Optional[torch.Tensor] = None
        # float64 shifted cross-products: "ab" (d_a, d_b); with full=True also "aa", "bb".
        # With full=True they are views of one float64 (d_a + d_b) square matrix, _gram.
        self._blocks: dict[str, torch.Tensor] = {}
        self._gram: Optional[torch.Tensor] = None
        # The GEMM plan: unit segments of a and b, and the segment pairs multiplied.
        self._segments: list[_Segment] = []
        self._pairs: list[tuple[int, int]] = []
        # float32 GEMM sums per segment pair not yet in _blocks, and the rows they hold.
        self._pending: dict[tuple[int, int], torch.Tensor] = {}
        self._pending_rows = 0

    # ---- shape ------------------------------------------------------------------------

    @property
    def d_a(self) -> Optional[int]:
        """Number of model a's units (None before the first batch).

        Example:
            >>> fastmerge.FeatureStats().update(torch.ones(3, 2), torch.ones(3, 5)).d_a
            2
        """
        return None if self.shift_a is None else int(self.shift_a.shape[0])

    @property
    def d_b(self) -> Optional[int]:
        """Number of model b's units (None before the first batch).

        Example:
            >>> fastmerge.FeatureStats().update(torch.ones(3, 2), torch.ones(3, 5)).d_b
            5
        """
        return None if self.shift_b is None else int(self.shift_b.shape[0])

    @property
    def device(self) -> Optional[torch.device]:
        """Device of the accumulators (None before the first batch).

        Example:
            >>> fastmerge.FeatureStats().update(torch.ones(3, 2), torch.ones(3, 5)).device
            device(type='cpu')
        """
        return None if self.shift_a is None else self.shift_a.device

    @property
    def mean_a(self) -> torch.Tensor:
        """Per-unit mean of model a's activations, float64 (d_a,).

        Example:
            >>> s = fastmerge.FeatureStats().update(torch.tensor([[1.0], [3.0]]), torch.ones(2, 1))
            >>> s.mean_a.tolist()
            [2.0]
        """
        self._require_samples()
        return self.shift_a + self.sum_a / self.count

    @property
    def mean_b(self) -> torch.Tensor:
        """Per-unit mean of model b's activations, float64 (d_b,).

        Example:
            >>> s = fastmerge.FeatureStats().update(torch.ones(2, 1), torch.tensor([[1.0], [3.0]]))
            >>> s.mean_b.tolist()
            [2.0]
        """
        self._require_samples()
        return self.shift_b + self.sum_b / self.count

    def __repr__(self) -> str:
        return (
            f"FeatureStats(d_a={self.d_a}, d_b={self.d_b}, count={self.count}, "
            f"full={self.full}, device={self.device})"
        )

    # ---- accumulation -----------------------------------------------------------------

    def update(self, xa: TensorLike, xb: TensorLike) -> FeatureStats:
        """Add a batch of paired activations; returns ``self``.

        Args:
            xa: (N, d_a) or (N, C_a, *spatial) activations of model a.
            xb: (N, d_b) or (N, C_b, *spatial) activations of model b for the same inputs.

        Raises:
            TypeError: a non-floating or unsupported dtype.
            ValueError: different sample counts or devices for xa and xb, or a unit count
                or device that differs from earlier batches.

        Example:
            >>> stats = fastmerge.FeatureStats()
            >>> stats.update(torch.randn(32, 4), torch.randn(32, 6)).count
            32
        """
        a, b = _paired_samples(xa, xb)
        n, d_a, d_b = int(a.shape[0]), int(a.shape[1]), int(b.shape[1])
        chunk = CHUNK_ELEMENTS.get(a.device.type, CHUNK_ELEMENTS["cuda"])
        step = max(1, min(n, chunk // max(1, d_a + d_b)))
        if self.shift_a is not None:
            self._check_batch(a, b)
        elif n > 0:
            self._start(a[:step], b[:step])
        if n == 0:
            return self
        float64 = a.dtype == torch.float64 or b.dtype == torch.float64
        gemm_dtype = torch.float64 if float64 else torch.float32
        segments = self._segments
        buffers = [
            torch.empty((step, s.width), dtype=gemm_dtype, device=a.device) for s in segments
        ]
        with torch.no_grad():
            for first in range(0, n, step):
                last = min(n, first + step)
                centred = []
                for s, buffer in zip(segments, buffers):
                    x, shift, sums, sumsq = (
                        (a, self.shift_a, self.sum_a, self.sumsq_a)
                        if s.model == "a"
                        else (b, self.shift_b, self.sum_b, self.sumsq_b)
                    )
                    c, moments = feature_center(
                        x[first:last, s.lo : s.hi],
                        shift[s.lo : s.hi],
                        out=buffer[: last - first],
                        backend=self.backend,
                    )
                    sums[s.lo : s.hi] += moments[0]
                    sumsq[s.lo : s.hi] += moments[1]
                    centred.append(c)
                for i, j in self._pairs:
                    target = self._view(i, j) if float64 else self._pending_block(i, j)
                    target.addmm_(centred[i].T, centred[j])
        self.count += n
        if not float64:
            self._pending_rows += n
            if self._pending_rows >= FLUSH_ROWS:
                self._flush()
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Add the statistics of `other` (other samples of the same two models) to these;
        returns ``self``. Exact up to float64 rounding, whatever the two shifts.

        Example:
            >>> xa, xb = torch.randn(100, 3, dtype=torch.float64), torch.randn(100, 2)
            >>> left = fastmerge.FeatureStats().update(xa[:30], xb[:30])
            >>> right = fastmerge.FeatureStats().update(xa[30:] + 5, xb[30:])
            >>> whole = fastmerge.FeatureStats().update(torch.cat([xa[:30], xa[30:] + 5]), xb)
            >>> torch.allclose(left.merge(right).covariance(), whole.covariance())
            True
        """
        if not isinstance(other, FeatureStats):
            raise TypeError(f"other must be a FeatureStats, got {type(other).__name__}")
        if other is self:
            raise ValueError("cannot merge a FeatureStats with itself")
        if self.full != other.full:
            raise ValueError(
                f"cannot merge FeatureStats(full={self.full}) with FeatureStats(full={other.full})"
            )
        if other.shift_a is None:
            return self
        if self.shift_a is not None and (self.d_a, self.d_b) != (other.d_a, other.d_b):
            raise ValueError(
                f"cannot merge FeatureStats of (d_a, d_b) = {(self.d_a, self.d_b)} with "
                f"{(other.d_a, other.d_b)}"
            )
        other._flush()
        self._flush()
        if self.shift_a is None:
            self._load(other._state(), other.device)
            return self
        device = self.device
        o = {k: v.to(device) for k, v in other._state().items() if isinstance(v, torch.Tensor)}
        n = float(other.count)
        # Re-express other's sums around our shifts: with u = other's shift - ours,
        # sum (x - s)(y - t) = sum (x - s')(y - t') + u_x sum (y - t') + sum (x - s') u_y
        # + n u_x u_y, and the same for the sums and sums of squares.
        u_a = o["shift_a"] - self.shift_a
        u_b = o["shift_b"] - self.shift_b
        sa, sb = o["sum_a"], o["sum_b"]
        self._blocks["ab"] += _reshifted(o["cross_ab"], u_a, sa, u_b, sb, n)
        if self.full:
            self._blocks["aa"] += _reshifted(o["cross_aa"], u_a, sa, u_a, sa, n)
            self._blocks["bb"] += _reshifted(o["cross_bb"], u_b, sb, u_b, sb, n)
        self.sumsq_a += o["sumsq_a"] + 2 * u_a * sa + n * u_a * u_a
        self.sumsq_b += o["sumsq_b"] + 2 * u_b * sb + n * u_b * u_b
        self.sum_a += sa + n * u_a
        self.sum_b += sb + n * u_b
        self.count += other.count
        return self

    def all_reduce(self, group: Any = None) -> FeatureStats:
        """Sum these statistics over the ranks of a torch.distributed process group, in
        place, so that every rank holds the statistics of all ranks' batches; returns
        ``self``. A collective: every rank calls it (see :func:`fastmerge.dist.all_reduce_`).

        Example:
            >>> import os, tempfile
            >>> import torch.distributed as tdist
            >>> rendezvous = os.path.join(tempfile.mkdtemp(), "rendezvous")
            >>> tdist.init_process_group("gloo", init_method=f"file://{rendezvous}",
            ...                          rank=0, world_size=1)
            >>> stats = fastmerge.FeatureStats().update(torch.ones(4, 2), torch.ones(4, 3))
            >>> stats.all_reduce().count  # one rank: the statistics stay
            4
            >>> tdist.destroy_process_group()
        """
        return dist.all_reduce_(self, group)

    def _all_reduce(self, group: Any) -> FeatureStats:
        """fastmerge.dist.Reducible: agree on one rank's shifts, re-express every rank's
        sums around them (merge's algebra, so reducing equals merging), sum them."""
        started = self.shift_a is not None
        d_a, d_b = (self.d_a, self.d_b) if started else (-1, -1)
        rows = dist.describe_ranks(
            _REDUCTION_KIND, [float(self.full), float(self.count), d_a, d_b], group
        )
        if len({row[1] for row in rows}) > 1:
            raise ValueError(
                "cannot all-reduce FeatureStats with different `full` settings on the ranks: "
                f"{[bool(row[1]) for row in rows]} (by rank)"
            )
        holders = [r for r, row in enumerate(rows) if row[3] >= 0]
        if not holders:
            return self  # no rank has seen a batch: nothing to reduce
        shapes = {(int(rows[r][3]), int(rows[r][4])) for r in holders}
        if len(shapes) > 1:
            raise ValueError(
                "cannot all-reduce FeatureStats of different unit counts (d_a, d_b) on the "
                "ranks: "
                + ", ".join(f"rank {r}: {(int(rows[r][3]), int(rows[r][4]))}" for r in holders)
            )
        ((d_a, d_b),) = shapes
        if not started:
            self._start_empty(d_a, d_b, dist.home_device(group))
        self._flush()
        shift = dist.broadcast_tensor(torch.cat([self.shift_a, self.shift_b]), holders[0], group)
        shift_a, shift_b = shift[:d_a], shift[d_a:]
        totals = dist.sum_tensors(self._sums_around(shift_a, shift_b), group)
        self._load_sums(shift_a, shift_b, totals, int(sum(row[2] for row in rows)))
        return self

    # ---- costs --------------------------------------------------------------------------

    def cost(self, kind: str = "correlation", full: Optional[bool] = None) -> torch.Tensor:
        """The float64 cost matrix of `kind` (``"covariance"``, ``"correlation"``,
        ``"inner_product"``, ``"neg_sq_distance"``), one fused pass over the accumulators.

        Args:
            kind: which cost; every kind is a per-sample mean (see the class docs).
            full: True for the (d_a + d_b) square matrix (needs ``FeatureStats(full=True)``),
                False for the (d_a, d_b) cross block; default: ``self.full``.

        Example:
            >>> x = torch.tensor([[0.0], [2.0]])
            >>> fastmerge.FeatureStats().update(x, x + 1).cost("neg_sq_distance").tolist()
            [[-1.0]]
        """
        if not isinstance(kind, str) or kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self._require_samples()
        full = self.full if full is None else bool(full)
        if full and not self.full:
            raise ValueError(
                "full=True needs FeatureStats(full=True), which also accumulates the "
                "within-model blocks"
            )
        self._flush()
        if not full:
            return feature_cost(
                self._blocks["ab"],
                self.sum_a,
                self.sum_b,
                self.sumsq_a,
                self.sumsq_b,
                self.shift_a,
                self.shift_b,
                self.count,
                kind,
                backend=self.backend,
            )
        sums = torch.cat([self.sum_a, self.sum_b])
        sumsq = torch.cat([self.sumsq_a, self.sumsq_b])
        shift = torch.cat([self.shift_a, self.shift_b])
        cross = self._full_cross()
        return feature_cost(
            cross, sums, sums, sumsq, sumsq, shift, shift, self.count, kind, backend=self.backend
        )

    def covariance(self, full: Optional[bool] = None) -> torch.Tensor:
        """Population covariance ``E[(a_i - mu_i)(b_j - nu_j)]``, float64.

        Example:
            >>> x = torch.tensor([[1.0], [3.0]])
            >>> fastmerge.FeatureStats().update(x, 2 * x).covariance().tolist()
            [[2.0]]
        """
        return self.cost("covariance", full)

    def correlation(self, full: Optional[bool] = None) -> torch.Tensor:
        """Pearson correlation, float64 in [-1, 1]; 0 where a unit is constant.

        Example:
            >>> x = torch.tensor([[1.0, 5.0], [3.0, 5.0]])  # unit 1 is constant
            >>> fastmerge.FeatureStats().update(x, -x).correlation().tolist()
            [[-1.0, 0.0], [0.0, 0.0]]
        """
        return self.cost("correlation", full)

    def inner_product(self, full: Optional[bool] = None) -> torch.Tensor:
        """Mean inner product ``E[a_i b_j]``, float64.

        Example:
            >>> x = torch.tensor([[1.0], [3.0]])
            >>> fastmerge.FeatureStats().update(x, x).inner_product().tolist()
            [[5.0]]
        """
        return self.cost("inner_product", full)

    def neg_sq_distance(self, full: Optional[bool] = None) -> torch.Tensor:
        """Negative mean squared distance ``-E[(a_i - b_j)^2]``, float64 (the PLeaS cost).

        Example:
            >>> x = torch.tensor([[1.0], [3.0]])
            >>> fastmerge.FeatureStats().update(x, x + 2).neg_sq_distance().tolist()
            [[-4.0]]
        """
        return self.cost("neg_sq_distance", full)

    # ---- state --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The statistics as plain values and float64 tensors (for ``torch.save`` or
        gathering across ranks); :meth:`from_state_dict` rebuilds them.

        Example:
            >>> s = fastmerge.FeatureStats().update(torch.randn(5, 2), torch.randn(5, 3))
            >>> fastmerge.FeatureStats.from_state_dict(s.state_dict()).count
            5
        """
        self._flush()
        return {
            k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in self._state().items()
        }

    @classmethod
    def from_state_dict(
        cls, state: dict[str, Any], *, backend: Optional[str] = None
    ) -> FeatureStats:
        """Rebuild statistics saved by :meth:`state_dict`.

        Example:
            >>> s = fastmerge.FeatureStats(full=True).update(torch.randn(4, 2), torch.randn(4, 1))
            >>> fastmerge.FeatureStats.from_state_dict(s.state_dict()).correlation().shape
            torch.Size([3, 3])
        """
        stats = cls(full=bool(state["full"]), backend=backend)
        if state.get("shift_a") is not None:
            stats._load(state, state["shift_a"].device)
        return stats

    def to(self, device: torch.device | str) -> FeatureStats:
        """A copy of the statistics on `device`.

        Example:
            >>> s = fastmerge.FeatureStats().update(torch.randn(5, 2), torch.randn(5, 3))
            >>> s.to("cpu").device
            device(type='cpu')
        """
        self._flush()
        out = FeatureStats(self.full, backend=self.backend)
        if self.shift_a is not None:
            out._load(self._state(), torch.device(device))
        return out

    # ---- internals ----------------------------------------------------------------------

    def _start(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Shifts from the first rows of the first batch, zeroed accumulators on its device."""
        device = a.device
        self.shift_a, self.shift_b = _shift(a), _shift(b)
        d_a, d_b = int(a.shape[1]), int(b.shape[1])
        zeros = torch.zeros
        f64 = torch.float64
        self.sum_a, self.sumsq_a = (
            zeros(d_a, dtype=f64, device=device),
            zeros(d_a, dtype=f64, device=device),
        )
        self.sum_b, self.sumsq_b = (
            zeros(d_b, dtype=f64, device=device),
            zeros(d_b, dtype=f64, device=device),
        )
        self._allocate_blocks(device)

    def _start_empty(self, d_a: int, d_b: int, device: torch.device) -> None:
        """Zero shifts and accumulators for d_a and d_b units (a rank that saw no batch)."""
        f64 = dict(dtype=torch.float64, device=device)
        self.shift_a, self.shift_b = torch.zeros(d_a, **f64), torch.zeros(d_b, **f64)
        self.sum_a, self.sumsq_a = torch.zeros(d_a, **f64), torch.zeros(d_a, **f64)
        self.sum_b, self.sumsq_b = torch.zeros(d_b, **f64), torch.zeros(d_b, **f64)
        self._allocate_blocks(device)

    def _sums_around(self, shift_a: torch.Tensor, shift_b: torch.Tensor) -> list[torch.Tensor]:
        """[sum_a, sum_b, sumsq_a, sumsq_b, cross "ab"(, "aa", "bb")] re-expressed around
        other shifts (after _flush). The algebra is :meth:`merge`'s, term for term, so
        reducing these equals merging; like merge, the "ba" block is left to _flush (its
        mirror), which saves a quarter of the Gram matrix."""
        n = float(self.count)
        u_a, u_b = self.shift_a - shift_a, self.shift_b - shift_b
        sa, sb = self.sum_a, self.sum_b
        parts = [
            sa + n * u_a,
            sb + n * u_b,
            self.sumsq_a + 2 * u_a * sa + n * u_a * u_a,
            self.sumsq_b + 2 * u_b * sb + n * u_b * u_b,
            _reshifted(self._blocks["ab"], u_a, sa, u_b, sb, n),
        ]
        if self.full:
            parts.append(_reshifted(self._blocks["aa"], u_a, sa, u_a, sa, n))
            parts.append(_reshifted(self._blocks["bb"], u_b, sb, u_b, sb, n))
        return parts

    def _load_sums(
        self,
        shift_a: torch.Tensor,
        shift_b: torch.Tensor,
        sums: list[torch.Tensor],
        count: int,
    ) -> None:
        """Take sums laid out as by _sums_around (around shift_a, shift_b) as our own."""
        self.shift_a, self.shift_b = shift_a.clone(), shift_b.clone()
        self.sum_a, self.sum_b = sums[0].clone(), sums[1].clone()
        self.sumsq_a, self.sumsq_b = sums[2].clone(), sums[3].clone()
        for key, block in zip(("ab", "aa", "bb"), sums[4:]):
            self._blocks[key].copy_(block)
        self.count = int(count)
        self._flush()  # with full=True: the lower blocks mirror the upper ones, as in merge

    def _allocate_blocks(self, device: torch.device) -> None:
        """Zeroed float64 cross-product blocks and the GEMM plan for `device` (shift_a and
        shift_b must be set)."""
        d_a, d_b = self.d_a, self.d_b
        self._segments, self._pairs = _plan(d_a, d_b, self.full, device.type)
        if self.full:
            gram = torch.zeros((d_a + d_b, d_a + d_b), dtype=torch.float64, device=device)
            self._gram = gram
            self._blocks = {"ab": gram[:d_a, d_a:], "aa": gram[:d_a, :d_a], "bb": gram[d_a:, d_a:]}
        else:
            self._gram = None
            self._blocks = {"ab": torch.zeros((d_a, d_b), dtype=torch.float64, device=device)}

    def _view(self, i: int, j: int) -> torch.Tensor:
        """The float64 accumulator of the GEMM of segments i and j."""
        if self._gram is None:
            return self._blocks["ab"]
        si, sj = self._segments[i], self._segments[j]
        return self._gram[si.offset : si.offset + si.width, sj.offset : sj.offset + sj.width]

    def _pending_block(self, i: int, j: int) -> torch.Tensor:
        """The float32 accumulator of the GEMM of segments i and j (zeroed when new)."""
        block = self._pending.get((i, j))
        if block is None:
            shape = (self._segments[i].width, self._segments[j].width)
            block = self._pending[(i, j)] = torch.zeros(
                shape, dtype=torch.float32, device=self.device
            )
        return block

    def _flush(self) -> None:
        """Move the float32 GEMM sums into the float64 accumulators; with full=True, fill
        each block below the diagonal (never accumulated) from its mirror above it."""
        for (i, j), partial in self._pending.items():
            self._view(i, j).add_(partial)
        self._pending = {}
        self._pending_rows = 0
        if self._gram is not None:
            for i, j in self._pairs:
                if i != j:
                    self._view(j, i).copy_(self._view(i, j).T)

    def _check_batch(self, a: torch.Tensor, b: torch.Tensor) -> None:
        for x, name, d in ((a, "xa", self.d_a), (b, "xb", self.d_b)):
            if x.shape[1] != d:
                raise ValueError(
                    f"{name} has {x.shape[1]} units (dim 1) but earlier batches had {d}"
                )
        if a.device != self.device:
            raise ValueError(f"xa is on {a.device} but the statistics are on {self.device}")

    def _require_samples(self) -> None:
        if self.count == 0:
            raise ValueError("FeatureStats has no samples yet; call update(xa, xb) first")

    def _full_cross(self) -> torch.Tensor:
        """The (d_a + d_b) square matrix of shifted cross-products (after _flush)."""
        return self._gram

    def _state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"full": self.full, "count": self.count}
        for name in ("shift_a", "shift_b", "sum_a", "sum_b", "sumsq_a", "sumsq_b"):
            state[name] = getattr(self, name)
        for key, block in self._blocks.items():
            state[f"cross_{key}"] = block
        return state

    def _load(self, state: dict[str, Any], device: torch.device) -> None:
        """Copy `state` (as from _state) into self, on `device`."""
        if bool(state["full"]) != self.full:
            raise ValueError(
                f"state has full={state['full']} but these statistics have full={self.full}"
            )
        f64 = torch.float64
        for name in ("shift_a", "shift_b", "sum_a", "sum_b", "sumsq_a", "sumsq_b"):
            setattr(self, name, state[name].to(device=device, dtype=f64, copy=True))
        self._allocate_blocks(device)
        for key, block in self._blocks.items():
            block.copy_(state[f"cross_{key}"].to(device=device, dtype=f64))
        self.count = int(state["count"])
        self._pending, self._pending_rows = {}, 0


class _Segment(NamedTuple):
    """Units [lo, hi) of `model` ("a" or "b"), at `offset` in the concatenated units."""

    model: str
    lo: int
    hi: int
    offset: int

    @property
    def width(self) -> int:
        return self.hi - self.lo


def _plan(
    d_a: int, d_b: int, full: bool, device_type: str
) -> tuple[list[_Segment], list[tuple[int, int]]]:
    """Unit segments and the segment pairs whose GEMMs are accumulated.

    Cross statistics: one GEMM, a^T b. Full statistics: the concatenated units are cut
    into segments of at most FULL_SEGMENT_UNITS and only pairs i <= j are multiplied (the
    rest is their transpose), which for k segments costs (k + 1) / 2k of the whole Gram.
    """
    if not full:
        return [_Segment("a", 0, d_a, 0), _Segment("b", 0, d_b, d_a)], [(0, 1)]
    size = FULL_SEGMENT_UNITS.get(device_type, FULL_SEGMENT_UNITS["cuda"])
    segments = []
    for model, d, offset in (("a", d_a, 0), ("b", d_b, d_a)):
        k = max(1, -(-d // size))
        bounds = [d * i // k for i in range(k + 1)]
        segments += [
            _Segment(model, lo, hi, offset + lo)
            for lo, hi in zip(bounds[:-1], bounds[1:])
            if hi > lo
        ]
    pairs = [(i, j) for i in range(len(segments)) for j in range(i, len(segments))]
    return segments, pairs


def _paired_samples(xa: TensorLike, xb: TensorLike) -> tuple[torch.Tensor, torch.Tensor]:
    """xa and xb as (samples, units) matrices, checked against each other."""
    ta, tb = as_tensor(xa, "xa"), as_tensor(xb, "xb")
    for t, name in ((ta, "xa"), (tb, "xb")):
        if t.dtype not in KERNEL_DTYPE_CODES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported dtypes are {dtype_names()}")
        if t.dim() < 2:
            raise ValueError(
                f"{name} must have shape (N, d) or (N, C, *spatial), got {tuple(t.shape)}"
            )
    if ta.device != tb.device:
        raise ValueError(f"xa is on {ta.device} but xb is on {tb.device}")
    if ta.shape[0] != tb.shape[0]:
        raise ValueError(
            f"xa and xb must hold the same samples: xa has N={ta.shape[0]} "
            f"(shape {tuple(ta.shape)}), xb has N={tb.shape[0]} (shape {tuple(tb.shape)})"
        )
    a, b = _as_matrix(ta), _as_matrix(tb)
    if ta.shape[2:] != tb.shape[2:] or a.shape[0] != b.shape[0]:
        raise ValueError(
            f"xa and xb must hold the same samples: shapes {tuple(ta.shape)} and "
            f"{tuple(tb.shape)} differ beyond the unit dimension (dim 1)"
        )
    return a, b


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    """(N, C, *spatial) -> (N * prod(spatial), C); (N, d) unchanged. Detached."""
    t = t.detach()
    if t.dim() == 2:
        return t
    return t.movedim(1, -1).reshape(-1, t.shape[1])


def _shift(x: torch.Tensor) -> torch.Tensor:
    """Per-unit mean of a (samples, units) batch, rounded to float32, as float64: every
    GEMM dtype represents it exactly, so the shifted sums are exactly what was added."""
    if x.dtype == torch.float64:
        mean = x.mean(0)
    else:
        mean = torch.mean(x, 0, dtype=torch.float32)
    return mean.to(torch.float32).to(torch.float64)


def _reshifted(
    cross: torch.Tensor,
    u_rows: torch.Tensor,
    sum_rows: torch.Tensor,
    u_cols: torch.Tensor,
    sum_cols: torch.Tensor,
    n: float,
) -> torch.Tensor:
    """``sum (x + u_x)(y + u_y)`` from ``cross = sum x y`` and the sums of x and y."""
    out = cross + u_rows[:, None] * (sum_cols + n * u_cols)[None, :]
    return out + sum_rows[:, None] * u_cols[None, :]
