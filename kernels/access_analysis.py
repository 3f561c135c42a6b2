"""One compile-time access analysis per kernel specialization, not per call site.

When a graph calls a Triton kernel through ``wrap_triton`` (every op here does),
torch finds which pointer arguments the kernel writes by lowering the kernel to
Triton IR and walking it: ``identify_accessed_tensors`` (``identify_mutated_tensors``
in older torch). It does so for every call site, and more than once per call site
(functionalization, then Inductor's lowering). A DoRA module calls five to eight
kernels, so a model of ``L`` layers pays ``7·L`` times that many IR lowerings of
the same few kernels, each tens of milliseconds on the host.

The answer depends only on the IR, and the IR only on what Triton specializes:
the constexpr values, each tensor argument's dtype (and, for a real tensor, its
16-byte alignment), each integer's being 1 or a multiple of 16 and its range
(i32, i64; symbolic integers are all lowered alike), each float's and bool's
value, which arguments are ``None``, and any launch option passed along.
``memoized`` keys its cache by exactly that, for this package's kernels only;
any other kernel, or an argument of a kind the key does not know, goes to
torch's analysis as before.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["ANALYSES", "install", "memoized", "specialization_key"]

ANALYSES = ("identify_accessed_tensors", "identify_mutated_tensors")  # torch ≥ 2.12, and before
_PACKAGE = "dora_fused."


def _python_function(kernel: object) -> object:
    """The kernel's Python function, through an Autotuner's and a JITFunction's ``fn``."""
    while hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel


def _is_sympy(value: object) -> bool:
    return type(value).__module__.startswith("sympy.")


def _argument_key(value: object, constexpr: bool) -> tuple:
    """What Triton's lowering of one argument depends on; raises ``TypeError`` for an unknown kind."""
    if constexpr:
        hash(value)
        return ("constexpr", repr(value))
    if value is None:
        return ("none",)
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)) or _is_sympy(value):
        return ("symbolic",)  # torch lowers every symbolic value (Inductor's sympy ones too) as one placeholder
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int):  # lowered as i32, i64 or u64 by its range
        return ("int", value == 1, value % 16 == 0, value.bit_length() > 31, value < 0)
    if isinstance(value, float):
        return ("float", value)
    if type(value) is torch.Tensor:  # real: its alignment is specialized
        return ("tensor", value.dtype, value.data_ptr() % 16 == 0)
    dtype = getattr(value, "dtype", None)
    if isinstance(dtype, torch.dtype):  # a fake tensor or an Inductor buffer: lowered as a fresh one
        return ("tensor", dtype)
    raise TypeError(f"no specialization key for {type(value).__name__}")


@functools.cache
def _constexpr_flags(function: Callable[..., Any]) -> dict[str, bool]:
    """Each parameter of a kernel's Python function, and whether it is annotated ``tl.constexpr``."""
    parameters = inspect.signature(function).parameters
    return {name: "constexpr" in str(p.annotation) for name, p in parameters.items()}


def specialization_key(kernel: object, kwargs: dict[str, Any], *rest: object) -> tuple | None:
    """The cache key of one analysis, or ``None`` where it must not be cached."""
    function = _python_function(kernel)
    if not getattr(function, "__module__", "").startswith(_PACKAGE):
        return None
    try:
        constexprs = _constexpr_flags(function)
        arguments = tuple((name, _argument_key(kwargs[name], constexpr)) for name, constexpr in constexprs.items())
        names = set(constexprs)
        options = tuple(sorted((name, repr(value)) for name, value in kwargs.items() if name not in names))
        extra = repr(rest)
    except (KeyError, TypeError, ValueError):
        return None
    return (function, arguments, options, extra)


def memoized(analysis: Callable[..., Any]) -> Callable[..., Any]:
    """``analysis`` with a cache per ``specialization_key``; each caller gets its own copy of the result."""
    cache: dict[tuple, Any] = {}

    @functools.wraps(analysis)
    def cached(kernel: object, kwargs: dict[str, Any], *rest: object) -> Any:
        key = specialization_key(kernel, kwargs, *rest)
        if key is None:
            return analysis(kernel, kwargs, *rest)
        if key not in cache:
            cache[key] = analysis(kernel, kwargs, *rest)
        return copy.deepcopy(cache[key])

    cached.cache = cache  # type: ignore[attr-defined]
    cached.uncached = analysis  # type: ignore[attr-defined]
    return cached


def install() -> list[str]:
    """Memoize torch's analyses in ``torch._higher_order_ops.triton_kernel_wrap``; the names wrapped."""
    try:
        from torch._higher_order_ops import triton_kernel_wrap
    except ImportError:  # a torch without user Triton kernels in graphs: nothing to do
        return []
    wrapped = []
    for name in ANALYSES:
        analysis = getattr(triton_kernel_wrap, name, None)
        if analysis is not None and not hasattr(analysis, "uncached"):
            setattr(triton_kernel_wrap, name, memoized(analysis))
            wrapped.append(name)
    return wrapped
