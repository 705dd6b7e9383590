"""Tracing a model for its permutation groups: torch.fx graph and tensor shapes.

:func:`_trace` traces a model with a :class:`torch.fx.Tracer` that remembers which submodule
it is inside, so that a model fx cannot trace (data-dependent control flow) raises
:class:`~fastmerge.pleas.UntraceableModelError` naming the module, the last graph node and
the user's source line. :func:`_propagate_shapes` runs the traced graph once on the example
input (eval mode, no gradients, training flags restored) so that every node carries its
output shapes in ``node.meta["tensor_meta"]``, which the axis analysis
(:mod:`fastmerge.pleas.analysis`) reads.
"""

from __future__ import annotations

import os
import traceback
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ._common import _FROM_AXES_HINT
from .spec import UntraceableModelError

__all__: list[str] = []


class _Tracer(fx.Tracer):
    """fx tracer that remembers which submodule it is inside (for error messages)."""

    def __init__(self) -> None:
        super().__init__()
        self._fm_stack: list[tuple[str, str]] = []

    def call_module(self, m, forward, args, kwargs):  # noqa: D102
        try:
            name = self.path_of_module(m)
        except NameError:
            name = "<unregistered module>"
        self._fm_stack.append((name, type(m).__name__))
        out = super().call_module(m, forward, args, kwargs)
        self._fm_stack.pop()
        return out


def _user_frame(exc: BaseException) -> str:
    """`` at file:line `code` `` of the innermost frame of `exc` outside torch and this file."""
    torch_dir = os.path.dirname(torch.__file__)
    here = os.path.abspath(__file__)
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not os.path.abspath(f.filename).startswith(torch_dir)
        and os.path.abspath(f.filename) != here
    ]
    if not frames:
        return ""
    f = frames[-1]
    code = f" `{f.line.strip()}`" if f.line else ""
    return f" at {f.filename}:{f.lineno}{code}"


def _node_desc(node: fx.Node) -> str:
    """``node 'name' (op target)``, for error messages and exclusion reasons."""
    target = (
        node.target
        if isinstance(node.target, str)
        else getattr(node.target, "__name__", node.target)
    )
    return f"node {node.name!r} ({node.op} {target})"


def _trace(model: nn.Module) -> fx.GraphModule:
    """`model` traced by torch.fx; :class:`UntraceableModelError` naming where it failed."""
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        where = (
            f"inside module {tracer._fm_stack[-1][0]!r} ({tracer._fm_stack[-1][1]})"
            if tracer._fm_stack
            else f"in {type(model).__name__}.forward"
        )
        nodes = list(tracer.graph.nodes) if getattr(tracer, "graph", None) is not None else []
        last = nodes[-1] if nodes else None
        at_node = f", at {_node_desc(last)}" if last is not None else ""
        raise UntraceableModelError(
            f"torch.fx could not trace {type(model).__name__} {where}{at_node}"
            f"{_user_frame(exc)}: {type(exc).__name__}: {exc}. {_FROM_AXES_HINT}",
            node=last.name if last is not None else None,
            module=tracer._fm_stack[-1][0] if tracer._fm_stack else None,
        ) from exc
    name = model.__class__.__name__ if isinstance(model, nn.Module) else model.__name__
    return fx.GraphModule(tracer.root, graph, name)


class _ShapeProp(ShapeProp):
    """Shape propagation that remembers the node it is running (for error messages)."""

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        return super().run_node(n)


def _propagate_shapes(model: nn.Module, gm: fx.GraphModule, inputs: tuple) -> None:
    """Run `gm` once on `inputs` (eval mode, no grad) to fill every node's ``tensor_meta``.

    The training flags of `model` and `gm` are restored afterwards.
    """
    flags = [(m, m.training) for m in model.modules()] + [(gm, gm.training)]
    prop = _ShapeProp(gm)
    prop.current = None
    try:
        gm.eval()  # shapes only: keep running statistics untouched
        with torch.no_grad():
            prop.propagate(*inputs)
    except Exception as exc:
        node = prop.current
        at = f" at {_node_desc(node)}" if node is not None else ""
        raise UntraceableModelError(
            f"example_input: running the traced {type(model).__name__} failed{at}: "
            f"{type(exc).__name__}: {exc}",
            node=node.name if node is not None else None,
        ) from exc
    finally:
        for m, flag in flags:
            m.training = flag
