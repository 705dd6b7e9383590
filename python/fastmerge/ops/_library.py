"""One registration of a fastmerge op with torch's dispatcher (``torch.ops.fastmerge.*``).

:func:`define` turns an op's kernel into a ``torch.library`` custom op in the ``fastmerge``
namespace: the schema, the kernel registered per device (``"cpu"``, ``"cuda"``), a fake
(meta) implementation for ``torch.compile`` / ``torch.export`` / ``opcheck``, and, for a
differentiable op, its backward. It returns an :class:`Op`, which the public function
calls after validating its input::

    def _kernel(tensors: list[torch.Tensor], backend: Optional[str]) -> torch.Tensor:
        name = resolve(backend, tensors[0].device)      # real tensors, one device
        return _IMPLEMENTATIONS[name](tensors)

    def _fake(tensors, backend):                        # shapes and dtypes only
        return tensors[0].new_empty((3, len(tensors)), dtype=torch.float64)

    _OP = define("scope_stats", "(Tensor[] tensors, str? backend) -> Tensor",
                 _kernel, _fake, backward=_backward, setup_context=_setup_context)

    table = _OP(tensors, backend)   # in the public function

``Op.__call__`` is the eager fast path: on plain CPU/CUDA tensors outside any tracing it
calls the kernel directly (a ``torch.ops`` call costs several microseconds); under
``torch.compile`` / ``torch.export``, for fake tensors, tensor subclasses, an active
dispatch mode, or inputs that need autograd it goes through ``torch.ops.fastmerge.<name>``.
The ``backend`` argument travels in the schema, so ``backend="triton"`` or
``"reference"`` work in both routes (the kernel resolves it on the tensors' device).

An op with a data-dependent output size says so in its fake implementation::

    def _fake(x):
        n = torch.library.get_ctx().new_dynamic_size()
        return x.new_empty((n,))

No op of today needs that. An op whose failures depend on the data (``linear_assignment``:
an infeasible problem) returns a status tensor from its kernel instead of raising; the
public function raises from it eagerly and, when traced, checks it with
``torch._assert_async`` (see ``ops/linear_assignment.py``).

torch < 2.4 lacks these ``torch.library`` functions: then nothing is registered
(``torch.ops.fastmerge`` does not exist, :data:`REGISTERED` is False) and every call
runs the kernel eagerly, differentiable ops through an ``autograd.Function`` built from
the same backward, as before.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Callable, Optional

import torch

from .. import backends

NAMESPACE = "fastmerge"
#: Whether this torch can register custom ops (torch.library.register_* are torch >= 2.4).
REGISTERED = all(
    hasattr(torch.library, name)
    for name in ("define", "register_kernel", "register_fake", "register_autograd")
)
DEVICES = ("cpu", "cuda")

_LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT") if REGISTERED else None
_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))

try:
    from torch.compiler import is_compiling as _is_compiling
except ImportError:  # torch < 2.3
    try:
        from torch._dynamo import is_compiling as _is_compiling
    except ImportError:
        _is_compiling = lambda: False  # noqa: E731
_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 0)
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


class Op:
    """A registered fastmerge op: call it with the arguments of its schema.

    ``op(*args)`` picks the route (module docstring); ``op.kernel(*args)`` is the kernel
    on real tensors, ``op.overload`` the ``torch.ops.fastmerge.<name>.default`` overload
    (None on torch < 2.4).
    """

    def __init__(
        self,
        name: str,
        schema: str,
        kernel: Callable[..., Any],
        differentiable: bool,
        tensor_args: tuple[int, ...],
        list_args: tuple[int, ...],
        overload: Any,
        fallback: Optional[Callable[..., Any]],
    ) -> None:
        self.name, self.schema, self.kernel = name, schema, kernel
        self.differentiable = differentiable
        self.overload = overload
        self._tensor_args, self._list_args = tensor_args, list_args
        self._fallback = fallback

    def __repr__(self) -> str:
        return f"<fastmerge op {NAMESPACE}::{self.name}{self.schema}>"

    def __call__(self, *args: Any) -> Any:
        if self.needs_dispatcher(args):
            return self.dispatch(*args)
        return self.kernel(*args)

    def dispatch(self, *args: Any) -> Any:
        """Call through ``torch.ops.fastmerge.<name>`` (or the fallback on old torch)."""
        if self.overload is not None:
            return self.overload(*args)
        if self._fallback is not None:
            return self._fallback(*args)
        return self.kernel(*args)

    def needs_dispatcher(self, args: Sequence[Any]) -> bool:
        """Whether a call with `args` must go through torch's dispatcher: while compiling
        or tracing, for tensors that are not plain ones, or when autograd must record it."""
        if _is_compiling() or _dispatch_modes() or _functorch_active():
            return True
        grad = self.differentiable and torch.is_grad_enabled()
        for i in self._tensor_args:
            t = args[i]
            if t is not None and (type(t) not in _PLAIN or (grad and t.requires_grad)):
                return True
        for i in self._list_args:
            ts = args[i]
            if not _PLAIN.issuperset(map(type, ts)):
                return True
            if grad:
                for t in ts:
                    if t.requires_grad:
                        return True
        return False


def define(
    name: str,
    schema: str,
    kernel: Callable[..., Any],
    fake: Callable[..., Any],
    *,
    backward: Optional[Callable[..., Any]] = None,
    setup_context: Optional[Callable[..., None]] = None,
    devices: Sequence[str] = DEVICES,
) -> Op:
    """Register ``fastmerge::<name>`` and return its :class:`Op`.

    Args:
        name: the op's name, as in ``fastmerge.ops.<name>``.
        schema: its signature without the name, e.g. ``"(Tensor[] tensors, str? backend)
            -> Tensor"``; a mutated argument is written ``Tensor(a!) out``. No defaults:
            the dispatcher drops an argument equal to its default before calling the
            kernel, and the public function passes every argument anyway.
        kernel: the implementation on real tensors, registered for every device of
            `devices`; it takes the schema's arguments positionally.
        fake: the same signature, returning empty tensors of the outputs' shapes and
            dtypes (``torch.library.register_fake``).
        backward, setup_context: as for ``torch.library.register_autograd``; given for a
            differentiable op.
        devices: the device types the kernel is registered for.

    Example:
        >>> from fastmerge.ops._library import define
        >>> op = define("doc_twice", "(Tensor x) -> Tensor", lambda x: 2 * x,
        ...             lambda x: torch.empty_like(x))
        >>> op(torch.ones(2)).tolist(), torch.ops.fastmerge.doc_twice(torch.ones(1)).tolist()
        ([2.0, 2.0], [2.0])
    """
    if (backward is None) != (setup_context is None):
        raise ValueError(f"{name}: give both backward and setup_context, or neither")
    parsed = torch._C.parse_schema(f"{NAMESPACE}::{name}{schema}")
    tensor_args, list_args = [], []
    for i, argument in enumerate(parsed.arguments):
        kind = str(argument.type)
        if kind in ("Tensor", "Optional[Tensor]"):
            tensor_args.append(i)
        elif kind in ("List[Tensor]", "List[Optional[Tensor]]"):
            list_args.append(i)
    overload = fallback = None
    if REGISTERED:
        qualname = f"{NAMESPACE}::{name}"
        torch.library.define(qualname, schema, lib=_LIBRARY)
        torch.library.register_kernel(qualname, tuple(devices), kernel, lib=_LIBRARY)
        torch.library.register_fake(qualname, fake, lib=_LIBRARY)
        if backward is not None:
            torch.library.register_autograd(
                qualname, backward, setup_context=setup_context, lib=_LIBRARY
            )
        overload = getattr(torch.ops.fastmerge, name).default
    elif backward is not None:
        fallback = _autograd_fallback(name, kernel, backward, setup_context, tuple(list_args))
    return Op(
        name,
        schema,
        kernel,
        backward is not None,
        tuple(tensor_args),
        tuple(list_args),
        overload,
        fallback,
    )


def tracing(*tensors: Any) -> bool:
    """Whether the tensors are being traced (torch.compile, torch.export, a dispatch mode)
    or have no data of their own (fake tensors, subclasses): checks that read data
    pointers, such as the overlap of an `out` with an input, do not apply then.

    Example:
        >>> tracing(torch.ones(2)), tracing(torch.empty(2, device="meta"))
        (False, False)
    """
    if _is_compiling() or _dispatch_modes():
        return True
    return not _PLAIN.issuperset(map(type, tensors))


def resolve(
    backend: Optional[str], device: torch.device, implemented: tuple[str, ...] = backends.BACKENDS
) -> str:
    """:func:`fastmerge.backends.resolve_backend`, remembered per (request, environment,
    device): a kernel on a tiny input must not spend a microsecond re-probing the
    extensions. Only successful resolutions are remembered; errors are raised each time.

    Example:
        >>> resolve(None, torch.device("cpu")), resolve("reference", torch.device("cpu"))
        ('cpu', 'reference')
    """
    # The environment as os.environ keeps it (os.environ.get decodes: ~0.4 us a read);
    # backends.unavailable_reason in the key: a replaced probe (tests) is a new situation.
    key = (backend, _ENVIRON.get(_ENV_BACKEND), _ENVIRON.get(_ENV_TRITON), device,
           backends.unavailable_reason)  # fmt: skip
    if implemented is not backends.BACKENDS:
        key = (*key, implemented)
    name = _RESOLVED.get(key)
    if name is None:
        name = backends.resolve_backend(backend, device, implemented)
        _RESOLVED[key] = name
    return name


_RESOLVED: dict[tuple, str] = {}
_ENVIRON = getattr(os.environ, "_data", None)
if isinstance(_ENVIRON, dict) and hasattr(os.environ, "encodekey"):
    _ENV_BACKEND = os.environ.encodekey(backends.ENV_BACKEND)
    _ENV_TRITON = os.environ.encodekey("TRITON_INTERPRET")
else:  # another Python: the public mapping
    _ENVIRON, _ENV_BACKEND, _ENV_TRITON = os.environ, backends.ENV_BACKEND, "TRITON_INTERPRET"


def _autograd_fallback(
    name: str,
    kernel: Callable[..., Any],
    backward: Callable[..., Any],
    setup_context: Callable[..., None],
    list_args: tuple[int, ...],
) -> Callable[..., Any]:
    """An ``autograd.Function`` running `kernel` with the registered backward, for torch
    without ``torch.library.register_autograd``. Tensor-list arguments are passed flat
    (autograd tracks only direct tensor arguments) and regrouped around the user's code,
    so that `backward` sees the same structure as under ``register_autograd``."""

    def group(flat: Sequence[Any], sizes: tuple[int, ...]) -> list[Any]:
        args, at = [], 0
        for size in sizes:
            if size < 0:
                args.append(flat[at])
                at += 1
            else:
                args.append(list(flat[at : at + size]))
                at += size
        return args

    def forward(ctx, sizes, *flat):
        args = group(flat, sizes)
        output = kernel(*args)
        setup_context(ctx, tuple(args), output)
        ctx.fastmerge_sizes = sizes
        return output

    def run_backward(ctx, *grads):
        sizes = ctx.fastmerge_sizes
        flat_needs = ctx.needs_input_grad
        ctx.needs_input_grad = tuple(group(flat_needs[1:], sizes))
        try:
            result = backward(ctx, *grads)
        finally:  # a retained graph runs backward again
            ctx.needs_input_grad = flat_needs
        result = result if isinstance(result, tuple) else (result,)
        flat: list[Any] = [None]  # for `sizes`
        for size, grad in zip(sizes, result):
            if size < 0:
                flat.append(grad)
            else:
                flat.extend(grad if grad is not None else [None] * size)
        return tuple(flat)

    function = type(
        f"FastmergeFallback_{name}",
        (torch.autograd.Function,),
        {"forward": staticmethod(forward), "backward": staticmethod(run_backward)},
    )

    def call(*args: Any) -> Any:
        sizes = tuple(len(a) if i in list_args else -1 for i, a in enumerate(args))
        flat = [x for i, a in enumerate(args) for x in (a if i in list_args else (a,))]
        return function.apply(sizes, *flat)

    return call
