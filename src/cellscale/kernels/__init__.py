"""Compiled CPU kernels, built on first use with ``torch.utils.cpp_extension``.

``fused_dropout_attention`` is multi-head attention with dropout on the attention
probabilities (the study's layer) in one C++ kernel: scores stay in cache, the dropout mask
is a counter-based hash drawn inside the loop and recomputed in backward, so nothing of size
[B, H, V, V] ever reaches memory (~9x faster than SDPA's math path, which torch takes for
attention dropout on CPU); see ``dropout_attention.cpp`` and ``benchmarks/README.md``.
``fused_dropout`` is the same hash mask for elementwise dropout, and ``fused_gelu_dropout``
the FFN's GELU with its dropout in one pass.

The build (~1 min, once per machine, torch version and Python environment) needs a C++
compiler and ninja (a Python dependency); it is cached under ``$CELLSCALE_KERNEL_CACHE``
(default ``~/.cache/cellscale/kernels``), one directory per CPU, torch version and
interpreter, so that virtual environments sharing the cache do not rebuild each other's;
``python -m cellscale.kernels`` builds it ahead of time (the test suite does, at its start). A
build killed midway leaves no lock that later runs wait on forever (``cellscale.kernels.lock``:
a stale lock is removed, a live build is waited for at most ``$CELLSCALE_KERNEL_WAIT`` seconds,
600 by default, then SDPA is used, with one line saying why). Where it cannot be built,
:func:`available` is False with the reason in :func:`unavailable_reason` and the model falls
back to SDPA's math path (same function, slower); ``CELLSCALE_KERNELS=0`` forces that fallback.

Imports only torch.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "available",
    "unavailable_reason",
    "load",
    "fused_dropout_attention",
    "fused_dropout",
    "fused_gelu_dropout",
    "fused_keep_mask",
    "fused_keep_scale",
]

_SOURCE = Path(__file__).with_name("dropout_attention.cpp")
_EXT: Any = None
_ERROR: str | None = None
_WARNED = False


def _cpu_tag() -> str:
    """Short hash of the CPU's feature flags: the build uses -march=native."""
    flags = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags += line
                break
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


def _env_tag() -> str:
    """Short hash of the interpreter and torch install: the build flags name their include
    paths, so two virtual environments sharing the cache each keep their own build instead of
    rebuilding (about a minute) every time the user switches between them."""
    import sysconfig

    parts = (sys.version, os.path.realpath(sys.prefix), os.path.realpath(os.path.dirname(torch.__file__)),
             sysconfig.get_paths().get("include", ""))
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:8]


def cache_dir() -> Path:
    root = os.environ.get("CELLSCALE_KERNEL_CACHE") or Path.home() / ".cache" / "cellscale" / "kernels"
    tv = torch.__version__.replace("+", "_").replace(".", "_")
    return Path(root) / f"torch{tv}-{_cpu_tag()}-py{_env_tag()}"


def _lock_wait_s() -> float:
    """How long a run waits for another process's build of the kernel before it falls back to
    SDPA (``CELLSCALE_KERNEL_WAIT`` seconds; a build takes about a minute)."""
    try:
        return float(os.environ.get("CELLSCALE_KERNEL_WAIT", "600"))
    except ValueError:
        return 600.0


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _compile(build: Path, *, verbose: bool) -> Any:
    """``cpp_extension.load`` into ``build``, under cellscale's build lock (a stale lock of a
    killed build is removed; a live one is waited for, at most ``_lock_wait_s()``)."""
    from torch.utils import cpp_extension

    from cellscale.kernels.lock import build_lock

    # ninja from the Python package when the system has none
    try:
        import ninja  # type: ignore[import-not-found]

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    flags = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
             "-ffp-contract=fast"]
    with build_lock(build, timeout=_lock_wait_s(), say=_say):
        if not (build / "cellscale_dropout_attention.so").exists():
            _say("cellscale: compiling the fused CPU attention kernel (once per machine and torch "
                 "version, about a minute)")
        return cpp_extension.load(
            name="cellscale_dropout_attention",
            sources=[str(_SOURCE)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build),
            verbose=verbose,
        )


def load(*, verbose: bool = False) -> Any:
    """The compiled extension module (built if needed), or None where it cannot be built."""
    global _EXT, _ERROR
    if _EXT is not None or _ERROR is not None:
        return _EXT
    if os.environ.get("CELLSCALE_KERNELS", "1") == "0":
        _ERROR = "disabled by CELLSCALE_KERNELS=0"
        return None
    from cellscale.kernels.lock import LockTimeout

    try:
        build = cache_dir()
        build.mkdir(parents=True, exist_ok=True)
        _EXT = _compile(build, verbose=verbose)
    except LockTimeout as e:  # a live build held the directory too long: SDPA, and why
        _ERROR = str(e)
        _EXT = None
        _say(f"cellscale: {e}; this run uses SDPA's slower math path")
    except Exception as e:  # no compiler, no ninja, a read-only cache, ...
        msg = str(e).strip().splitlines()
        _ERROR = f"{type(e).__name__}: {msg[-1] if msg else ''}"[:300]
        _EXT = None
    return _EXT


def available() -> bool:
    return load() is not None


def unavailable_reason() -> str | None:
    load()
    return _ERROR


def warn_fallback() -> None:
    """Warn once that CPU attention dropout runs on the slow path."""
    global _WARNED
    if not _WARNED:
        _WARNED = True
        warnings.warn(
            "cellscale: the fused CPU attention kernel is unavailable "
            f"({unavailable_reason()}); attention dropout runs on SDPA's slower math path",
            RuntimeWarning,
            stacklevel=3,
        )


# torch custom operators (not autograd.Functions around pybind calls), so that torch.compile
# traces through them without graph breaks. The seed travels as an int64 tensor [1]: drawing
# it (torch.randint) stays inside a compiled graph, reading it happens inside the operator.
@torch.library.custom_op("cellscale::dropout_attention", mutates_args=())
def _attention_op(qkv: Tensor, n_heads: int, p: float, seed: Tensor) -> tuple[Tensor, Tensor]:
    return tuple(_require().forward(qkv.contiguous(), n_heads, p, int(seed.item())))


@_attention_op.register_fake
def _(qkv: Tensor, n_heads: int, p: float, seed: Tensor) -> tuple[Tensor, Tensor]:
    B, V, d3 = qkv.shape
    return qkv.new_empty(B, V, d3 // 3), qkv.new_empty(B, n_heads, V)


@torch.library.custom_op("cellscale::dropout_attention_backward", mutates_args=())
def _attention_backward_op(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, n_heads: int,
                           p: float, seed: Tensor) -> Tensor:
    return _require().backward(dout.contiguous(), qkv.contiguous(), out, lse, n_heads, p, int(seed.item()))


@_attention_backward_op.register_fake
def _(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, n_heads: int, p: float, seed: Tensor) -> Tensor:
    return torch.empty_like(qkv)


def _attention_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    qkv, n_heads, p, seed = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, seed)
    ctx.n_heads, ctx.p = n_heads, p


def _attention_backward(ctx: Any, dout: Tensor, dlse: Tensor | None) -> tuple:
    qkv, out, lse, seed = ctx.saved_tensors  # lse is an auxiliary output: no gradient flows from it
    return _attention_backward_op(dout, qkv, out, lse, ctx.n_heads, ctx.p, seed), None, None, None


_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup)


def _shaped_like_first(t: Tensor, *rest: Any) -> Tensor:
    """Fake kernel of the elementwise ops: the output is shaped like the first input."""
    return torch.empty_like(t)


@torch.library.custom_op("cellscale::hash_dropout", mutates_args=())
def _dropout_op(x: Tensor, p: float, seed: Tensor) -> Tensor:
    return _require().dropout(x, p, int(seed.item()))


def _dropout_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    _, p, seed = inputs
    ctx.save_for_backward(seed)
    ctx.p = p


def _dropout_backward(ctx: Any, g: Tensor) -> tuple:
    (seed,) = ctx.saved_tensors
    return _dropout_op(g, ctx.p, seed), None, None  # the same mask and scale


_dropout_op.register_fake(_shaped_like_first)
_dropout_op.register_autograd(_dropout_backward, setup_context=_dropout_setup)


@torch.library.custom_op("cellscale::gelu_dropout", mutates_args=())
def _gelu_dropout_op(x: Tensor, p: float, seed: Tensor) -> Tensor:
    return _require().gelu_dropout(x, p, int(seed.item()))


@torch.library.custom_op("cellscale::gelu_dropout_backward", mutates_args=())
def _gelu_dropout_backward_op(g: Tensor, x: Tensor, p: float, seed: Tensor) -> Tensor:
    return _require().gelu_dropout_backward(g, x, p, int(seed.item()))


def _gelu_dropout_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x, p, seed = inputs
    ctx.save_for_backward(x, seed)
    ctx.p = p


def _gelu_dropout_backward(ctx: Any, g: Tensor) -> tuple:
    x, seed = ctx.saved_tensors
    return _gelu_dropout_backward_op(g, x, ctx.p, seed), None, None


_gelu_dropout_op.register_fake(_shaped_like_first)
_gelu_dropout_backward_op.register_fake(_shaped_like_first)
_gelu_dropout_op.register_autograd(_gelu_dropout_backward, setup_context=_gelu_dropout_setup)


def _require() -> Any:
    """The extension, built on first use; RuntimeError (with the reason) where it cannot be."""
    ext = load()
    if ext is None:
        raise RuntimeError(f"cellscale's fused CPU kernels are unavailable: {unavailable_reason()}")
    return ext


def _seed_tensor(seed: int | None) -> Tensor:
    if seed is None:
        return torch.randint(0, 2**62, (1,), dtype=torch.int64)
    return torch.tensor([seed], dtype=torch.int64)


def fused_dropout_attention(qkv: Tensor, n_heads: int, p: float, *, seed: int | None = None) -> Tensor:
    """Attention of a fused projection ``qkv`` [B, V, 3d] (q, k, v stacked as in
    ``MultiheadAttention.in_proj_weight``, heads inside each) -> [B, V, d], dropout ``p`` on
    the attention probabilities (p quantised to 2^-32, kept values scaled exactly by
    :func:`fused_keep_scale`). ``seed`` (default: drawn from torch's global CPU generator, so
    ``torch.manual_seed`` makes runs repeatable) fixes the mask, see :func:`fused_keep_mask`.
    CPU, float32; raises RuntimeError where the kernels cannot be built (see :func:`available`).
    """
    return _attention_op(qkv, n_heads, float(p), _seed_tensor(seed))[0]


def fused_dropout(x: Tensor, p: float, *, seed: int | None = None) -> Tensor:
    """``F.dropout(x, p, training=True)`` semantics (CPU, float32) with the kernel's
    counter-based mask: one pass, and no mask kept for backward (it is recomputed from the
    seed). ``seed`` defaults to a draw from torch's global CPU generator."""
    return _dropout_op(x, float(p), _seed_tensor(seed))


def fused_gelu_dropout(x: Tensor, p: float, *, seed: int | None = None) -> Tensor:
    """``fused_dropout(F.gelu(x), p, seed=seed)`` in one pass forward and one backward (CPU,
    float32). The exact GELU ``x Phi(x)``, with ``erf`` from Abramowitz & Stegun 7.1.26 (absolute
    error < 1.5e-7, so the result is within ~1e-7 |x| of torch's); same mask and scale as
    :func:`fused_dropout` for the same seed."""
    return _gelu_dropout_op(x, float(p), _seed_tensor(seed))


def fused_keep_mask(B: int, n_heads: int, V: int, p: float, seed: int) -> Tensor:
    """The [B, H, V, V] bool keep mask that :func:`fused_dropout_attention` uses for ``seed``."""
    return _require().keep_mask(B, n_heads, V, float(p), seed)


def fused_keep_scale(p: float) -> float:
    """The factor kept probabilities are scaled by (1 / keep probability)."""
    return float(_require().keep_scale(float(p)))
