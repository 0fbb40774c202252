"""The CPU kernels: attention (`csrc/attention.c`), GroupNorm + SiLU of channels_last maps
(`csrc/group_norm.c`) and activations to uint8 for the int8 ops (`csrc/quantize.c`), compiled into one library
on this machine at first use, loaded with ctypes and bound from one table of entry points (`ENTRY_POINTS`).

No wheel and no torch headers: the C files need only a C compiler with OpenMP (gcc or clang; `$CC`
if set) and an x86-64 CPU with AVX-512 (bf16 inputs also need AVX512-BF16). They are compiled once, in
about a second, for the features of this CPU, into a cache folder (`$MOBILEDIFFUSION_CACHE`, else
`$XDG_CACHE_HOME/mobilediffusion`, else `~/.cache/mobilediffusion`) under a name that hashes the
sources, the flags and the compiler, and reused by later processes. Where that is not possible
(another CPU, no compiler, a failed build) `unavailable()` says why, and `ops.choose_backend` keeps
the reference path with one log line saying so.

On x86-64 CPUs with AVX2 + FMA but no AVX-512 (AMD Zen 2 and 3, many Intel desktop CPUs), a second library is
built the same way from `csrc/avx2.c`: fp32 attention (the same entry point, so `load()` gives it, with no group
norm, bf16 or int8 entry points beside it) and the fp32 linear (`linear_kernel()`, used by `mobilediffusion.packed`;
SD1.5's linears at 90-100% of the fp32 peak against torch's 60-75%, its 4096-token attention 1.45x torch's).

The kernels run on torch's intra-op thread count, inside the OpenMP runtime torch already loaded
(gcc's libgomp resolves to the copy torch ships). Under torch.compile attention is the custom op
`mobilediffusion::cpu_attention`, opaque to the compiler; the group norm leaves compiled graphs to
inductor (`group_norm_unsupported`).
"""
from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import logging
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("mobilediffusion.ops")

CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "attention.c", CSRC / "group_norm.c", CSRC / "quantize.c")  # compiled into one library
HEADERS = (CSRC / "simd.h",)
ABI = 4  # md_attention_abi() of the sources this module calls
# argument kinds of the C entry points: p a pointer (data_ptr() or None), i int64_t, s int64_t[3] (strides),
# f float, c int
_KINDS = {"p": ctypes.c_void_p, "i": ctypes.c_int64, "s": ctypes.POINTER(ctypes.c_int64), "f": ctypes.c_float,
          "c": ctypes.c_int}
# every entry point: (its arguments' kinds, built only with AVX512-BF16); all return int (0: done)
ENTRY_POINTS = {
    "md_attention_f32": ("ppppiiiiissssfc", False),  # q, k, v, out, B, H, Tq, Tk, d, 4 strides, scale, threads
    "md_attention_bf16": ("ppppiiiiissssfc", True),
    "md_group_norm_f32": ("ppiiiippfcc", False),  # x, y, n, hw, c, groups, weight, bias, eps, silu, threads
    "md_group_norm_bf16": ("ppiiiippfcc", True),
    "md_group_norm_u8_bf16": ("ppiiiippfccp", True),  # ... y uint8, and float[2] (scale, zero point): in, or out
    "md_quantize_u8_f32": ("ppifcc", False),  # x, y (uint8), n, 1 / scale, zero point, threads
    "md_quantize_u8_bf16": ("ppifcc", True),
    "md_minmax_f32": ("pipc", False),  # x, n, out (float[2]: min, max), threads
    "md_minmax_bf16": ("pipc", True),
}
# wider heads take the reference path: fp32 heads of 512 (the KL VAE's attention) ran at 0.9-1.0x torch's
# kernel, bf16 ones at 2x; scratch per thread grows with d
MAX_HEAD_DIM = {torch.float32: 256, torch.bfloat16: 512}
BASE_FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl",
              "-mfma")
BF16_FLAGS = ("-mavx512bf16",)
REQUIRED_CPU = ("avx512f", "avx512dq", "avx512bw", "avx512vl", "fma")


@dataclasses.dataclass(frozen=True)
class Kernel:
    """The loaded library: its entry points by name (the bf16 ones only where the CPU and compiler have
    AVX512-BF16)."""

    path: Path  # the shared library
    fns: dict  # ENTRY_POINTS name -> ctypes function

    def dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32,) + ((torch.bfloat16,) if "md_attention_bf16" in self.fns else ())

    def fn(self, op: str, dtype: torch.dtype):
        """The entry point md_<op>_<f32|bf16> for tensors of `dtype` (one `dtypes()` lists)."""
        return self.fns[f"md_{op}_{'bf16' if dtype == torch.bfloat16 else 'f32'}"]


def cache_dir() -> Path:
    """Where compiled kernels are kept (see the module docstring)."""
    if os.environ.get("MOBILEDIFFUSION_CACHE"):
        return Path(os.environ["MOBILEDIFFUSION_CACHE"]) / "native"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mobilediffusion" / "native"


def cpu_flags() -> set[str]:
    """The CPU feature flags of this machine (Linux /proc/cpuinfo; empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def find_compiler() -> list[str] | None:
    """The C compiler command: $CC if set, else the first of cc, gcc, clang on PATH."""
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return [path]
    return None


def _platform_why() -> str | None:
    if not sys.platform.startswith("linux"):
        return f"the CPU attention kernel is built on Linux only (this is {sys.platform})"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the CPU attention kernel needs an x86-64 CPU (this is {platform.machine()})"
    return None


def _why_not_here(flags: set[str]) -> str | None:
    """Why the AVX-512 library cannot run here, or None."""
    why = _platform_why()
    if why:
        return why
    missing = [f for f in REQUIRED_CPU if f not in flags]
    if missing:
        return f"this CPU lacks {', '.join(missing)} (the CPU kernels need AVX-512, or AVX2 + FMA)"
    return None


def _compile(cc: list[str], flags: tuple[str, ...], out_dir: Path, sources=SOURCES, name: str = "attention") -> Path:
    """The library of `sources` for `flags`, compiled into out_dir unless a build of the same source, flags and
    compiler is already there. Raises RuntimeError with the compiler's message on failure."""
    source = b"\0".join(f.read_bytes() for f in sources + HEADERS)
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), " ".join(cc).encode(), version.encode()]))
    target = out_dir / f"{name}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    # imported here: this file also loads on its own, outside the package (a second copy, see _register_op)
    from ..atomic import atomic_file

    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with atomic_file(target) as tmp:  # renamed into place: concurrent builds are safe
        done = subprocess.run([*cc, *flags, "-o", str(tmp), *map(str, sources)], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            message = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise RuntimeError(f"{' '.join(cc)} failed: {message}")
    log.info("compiled the CPU %s kernel in %.1f s: %s", name, time.perf_counter() - start, target)
    return target


def _bind(path: Path) -> Kernel:
    lib = ctypes.CDLL(str(path))
    if lib.md_attention_abi() != ABI:
        raise RuntimeError(f"{path} has entry points of version {lib.md_attention_abi()}, expected {ABI}")
    bf16 = bool(lib.md_attention_has_bf16())
    fns = {}
    for name, (kinds, needs_bf16) in ENTRY_POINTS.items():
        if needs_bf16 and not bf16:
            continue
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = ctypes.c_int, [_KINDS[k] for k in kinds]
        fns[name] = fn
    return Kernel(path, fns)


_LOADED: dict[str, tuple[Kernel | None, str | None]] = {}  # "result" -> what load() returned first


def load() -> tuple[Kernel | None, str | None]:
    """(the kernel, None), or (None, why it cannot run here). Compiles at the first call in a process
    (unless cached on disk); later calls return the same result (a dict lookup torch.compile can trace)."""
    if "result" not in _LOADED:
        _LOADED["result"] = _load()
    return _LOADED["result"]


def _load() -> tuple[Kernel | None, str | None]:
    flags = cpu_flags()
    why = _why_not_here(flags)
    if why and _platform_why() is None and AVX2_CPU <= flags:  # no AVX-512: the AVX2 library's attention
        kernel, why_avx2 = avx2_kernel()
        if kernel is None:
            return None, why_avx2
        return Kernel(kernel.path, {"md_attention_f32": kernel.fns["md_attention_f32"]}), None
    if why:
        return None, why
    cc = find_compiler()
    if cc is None:
        return None, "no C compiler found (install gcc, or set CC) to build the CPU attention kernel"
    builds = ([BASE_FLAGS + BF16_FLAGS] if "avx512_bf16" in flags else []) + [BASE_FLAGS]
    errors = []
    for build in builds:  # with bf16 where the CPU has it; a compiler without -mavx512bf16 builds fp32 only
        try:
            return _bind(_compile(cc, build, cache_dir())), None
        except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
            errors.append(str(e))
    return None, f"building the CPU attention kernel failed ({'; '.join(errors)})"


def unavailable() -> str | None:
    """Why the CPU attention kernel cannot run on this machine, or None if it can."""
    return load()[1]


AVX2_SOURCES = (CSRC / "avx2.c",)
AVX2_FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-mavx2", "-mfma")
AVX2_CPU = {"avx2", "fma"}
AVX2_ABI = 1  # md_avx2_abi() of avx2.c
AVX2_ENTRY_POINTS = {
    "md_attention_f32": ENTRY_POINTS["md_attention_f32"][0],  # as attention.c's
    "md_linear_pack_f32": "ppii",  # w (N, K), packed out, N, K
    "md_linear_f32": "pipppiiiic",  # x, x's row stride, packed w, bias (padded to 16) or None, y, y's row stride,
}                                   # M, N, K, threads


def avx2_kernel() -> tuple[Kernel | None, str | None]:
    """(the AVX2 library with every AVX2_ENTRY_POINTS entry, None), or (None, why not): built on any x86-64 Linux
    CPU with AVX2 and FMA (tests run it on AVX-512 CPUs too; models use it only without AVX-512). Compiled at the
    first call (or cached on disk), then the same result."""
    if "avx2" not in _LOADED:
        _LOADED["avx2"] = _load_avx2()
    return _LOADED["avx2"]


def _load_avx2() -> tuple[Kernel | None, str | None]:
    why = _platform_why()
    if why:
        return None, why
    if not AVX2_CPU <= cpu_flags():
        return None, "this CPU lacks avx2 / fma (the CPU kernels need AVX2 + FMA, or AVX-512)"
    cc = find_compiler()
    if cc is None:
        return None, "no C compiler found (install gcc, or set CC) to build the CPU AVX2 kernels"
    try:
        path = _compile(cc, AVX2_FLAGS, cache_dir(), AVX2_SOURCES, "avx2")
        lib = ctypes.CDLL(str(path))
        if lib.md_avx2_abi() != AVX2_ABI:
            raise RuntimeError(f"entry points of version {lib.md_avx2_abi()}, expected {AVX2_ABI}")
    except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
        return None, f"building the CPU AVX2 kernels failed ({e})"
    fns = {}
    for name, kinds in AVX2_ENTRY_POINTS.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = ctypes.c_int, [_KINDS[k] for k in kinds]
        fns[name] = fn
    return Kernel(path, fns), None


def linear_kernel() -> tuple[dict | None, str | None]:
    """({name: ctypes function} of the AVX2 library, None), or (None, why fp32 linears do not run it here): used on
    CPUs with AVX2 and FMA but without AVX-512 (with it, oneDNN's AVX-512 linear reached 83% of the peak)."""
    if "linear" not in _LOADED:  # (asked at every linear call: a dict lookup after the first)
        if "avx512f" in cpu_flags():
            _LOADED["linear"] = None, "this CPU has AVX-512 (its linears run oneDNN's AVX-512 kernels)"
        else:
            kernel, why = avx2_kernel()
            _LOADED["linear"] = (None, why) if kernel is None else (kernel.fns, None)
    return _LOADED["linear"]


def pack_linear_weight(w: torch.Tensor) -> torch.Tensor:
    """An fp32 weight (N, K) packed for `linear`: ceil(N / 16) panels of K x 16 (zeros past N)."""
    N, K = w.shape
    w = w.detach().float().contiguous()
    packed = torch.empty((N + 15) // 16 * 16 * K, dtype=torch.float32)
    linear_kernel()[0]["md_linear_pack_f32"](w.data_ptr(), packed.data_ptr(), N, K)
    return packed


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """x (..., K) fp32 on the CPU times a weight `pack_linear_weight` packed, plus `bias` (fp32, padded with zeros to
    the packed width, or None): (..., out_features), contiguous."""
    K = x.shape[-1]
    rows = x.reshape(-1, K)
    if rows.stride(-1) != 1 or (rows.shape[0] > 1 and rows.stride(0) < K):
        rows = rows.contiguous()
    y = torch.empty(rows.shape[0], out_features, dtype=torch.float32)
    with torch.profiler.record_function("mobilediffusion::cpu_linear"):
        linear_kernel()[0]["md_linear_f32"](rows.data_ptr(), rows.stride(0), packed.data_ptr(),
                                           None if bias is None else bias.data_ptr(), y.data_ptr(), out_features,
                                           rows.shape[0], out_features, K, torch.get_num_threads())
    return y.view(*x.shape[:-1], out_features)


def _not_for(t: torch.Tensor) -> str | None:
    """Why no kernel here takes tensors like t (none built, not on the CPU, another dtype), or None."""
    kernel, why = load()
    if kernel is None:
        return why
    if t.device.type != "cpu":
        return f"tensors on {t.device}, not the CPU"
    if t.dtype not in kernel.dtypes():
        return f"dtype {t.dtype} (the kernel here takes {', '.join(map(str, kernel.dtypes()))})"
    return None


def unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> str | None:
    """Why the kernel does not take these (already checked) attention inputs, or None if it does."""
    why = _not_for(q)
    if why:
        return why
    if q.shape[-1] > MAX_HEAD_DIM[q.dtype]:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM[q.dtype]} for {q.dtype}"
    if not (scale > 0 and math.isfinite(scale)):
        return f"scale {scale} (the kernel takes a finite positive scale)"
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        return "a head dim that is not contiguous"
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return "inputs that need gradients (the kernel has no backward)"
    return None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v for inputs `unsupported` accepts: q (B, heads, Tq, d), k and v
    (B, heads, Tk, d), any strides with a contiguous head dim. Returns (B, heads, Tq, d) laid out as
    (B, Tq, heads, d) in memory, so `out.transpose(1, 2).reshape(B, Tq, heads * d)` is a view."""
    if torch.compiler.is_compiling():
        return cpu_attention_op(q, k, v, scale)
    return _run(q, k, v, scale)


def _out_like(q):
    B, H, T, d = q.shape
    return q.new_empty(B, T, H, d).transpose(1, 2)  # (B, heads, T, d) view of (B, T, heads, d)


def _run(q, k, v, scale):
    kernel = load()[0]
    out = _out_like(q)
    B, H, T, d = q.shape
    strides = [(ctypes.c_int64 * 3)(*t.stride()[:3]) for t in (q, k, v, out)]  # batch, head, token
    fn = kernel.fn("attention", q.dtype)
    with torch.profiler.record_function("mobilediffusion::cpu_attention"):  # named in torch.profiler tables
        status = fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), B, H, T, k.shape[2], d, *strides,
                    scale, torch.get_num_threads())
    if status != 0:
        raise MemoryError(f"the CPU attention kernel could not allocate its scratch memory for q {tuple(q.shape)}, "
                          f"k {tuple(k.shape)}; free memory or use the reference ops backend")
    return out


def group_norm_unsupported(x: torch.Tensor) -> str | None:
    """Why the group-norm kernel does not take x (already checked by ops.group_norm_act), or None if it does:
    it takes 4-D channels_last fp32 (and bf16 where built) CPU maps in eager inference."""
    why = _not_for(x)
    if why:
        return why
    if "md_group_norm_f32" not in load()[0].fns:
        return "no group-norm kernel on this CPU (it needs AVX-512)"
    if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
        return "a map that is not 4-D channels_last"
    if torch.is_grad_enabled() and x.requires_grad:
        return "an input that needs gradients (the kernel has no backward)"
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return "tracing or compiling (the compiler fuses the norm itself)"
    return None


def group_norm_act(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float, silu: bool, *, inplace: bool = False) -> torch.Tensor:
    """GroupNorm (+ SiLU) of a map `group_norm_unsupported` accepts, written into x itself if `inplace`;
    (B, C, H, W) channels_last -> the same shape, layout and dtype."""
    out = x if inplace else torch.empty_like(x, memory_format=torch.channels_last)
    _group_norm(load()[0].fn("group_norm", x.dtype), "mobilediffusion::cpu_group_norm", x, out, num_groups, weight,
                bias, eps, silu)
    return out


def _group_norm(fn, label, x, out, num_groups, weight, bias, eps, silu, *extra) -> None:
    """Call a group-norm entry point on x (B, C, H, W) channels_last into out; `extra`: its trailing arguments."""
    B, C, H, W = x.shape
    # the parameters as they are (the model's dtype); cast, like the reference path, only if they differ
    affine = [None if t is None else t.detach().to(x.dtype).contiguous() for t in (weight, bias)]
    with torch.profiler.record_function(label):
        status = fn(x.data_ptr(), out.data_ptr(), B, H * W, C, num_groups,
                    *(None if t is None else t.data_ptr() for t in affine), eps, int(silu), torch.get_num_threads(),
                    *extra)
    if status != 0:
        raise MemoryError(f"the CPU group-norm kernel could not allocate its scratch memory for {tuple(x.shape)}; "
                          "free memory or use the reference ops backend")


def group_norm_u8(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                  eps: float, silu: bool, act: tuple[float, int] | None = None) -> tuple[torch.Tensor, float, int]:
    """GroupNorm (+ SiLU) of a bf16 map `group_norm_unsupported` accepts, written as uint8 for an int8 layer next:
    (uint8 (B, C, H, W) channels_last, scale, zero point). `act`: the (scale, zero point) to use (a calibrated
    layer's); None: the output's range, bounded from each channel's extremes in the statistics pass (no pass over
    the output)."""
    out = torch.empty(x.shape, dtype=torch.uint8, memory_format=torch.channels_last)
    qp = (ctypes.c_float * 2)(*(act if act else (0.0, 0.0)))
    _group_norm(load()[0].fns["md_group_norm_u8_bf16"], "mobilediffusion::cpu_group_norm_u8", x, out, num_groups,
                weight, bias, eps, silu, qp)
    return out, float(qp[0]), int(qp[1])


def dense(x: torch.Tensor) -> bool:
    """Whether x's elements fill its storage span in memory order (contiguous or channels_last), so a kernel can
    read it as one flat run."""
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


def quantize_u8(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """clamp(round(x / scale) + zero_point, 0, 255) as uint8, the same shape and memory layout, for a dense fp32 (or
    bf16 where built) CPU tensor `_not_for` accepts; one pass."""
    fn = load()[0].fn("quantize_u8", x.dtype)
    fmt = torch.channels_last if x.dim() == 4 and not x.is_contiguous() else torch.contiguous_format
    out = torch.empty(x.shape, dtype=torch.uint8, memory_format=fmt)
    with torch.profiler.record_function("mobilediffusion::cpu_quantize_u8"):
        fn(x.data_ptr(), out.data_ptr(), x.numel(), 1.0 / scale, int(zero_point), torch.get_num_threads())
    return out


def minmax(x: torch.Tensor) -> tuple[float, float]:
    """(smallest, largest) element of a dense CPU tensor `_not_for` accepts, NaNs skipped; one pass."""
    out = (ctypes.c_float * 2)()
    load()[0].fn("minmax", x.dtype)(x.data_ptr(), x.numel(), out, torch.get_num_threads())
    return float(out[0]), float(out[1])


def _op_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return _run(q, k, v, scale)


def _register_op():
    """The kernel as the torch custom op `mobilediffusion::cpu_attention`, which torch.compile keeps as one
    opaque call. A second copy of this package in the process (ComfyUI imports the plugin folder under its
    own name) reuses the op the first registered: the same kernel."""
    if hasattr(torch.ops.mobilediffusion, "cpu_attention"):
        return torch.ops.mobilediffusion.cpu_attention
    op = torch.library.custom_op("mobilediffusion::cpu_attention", mutates_args=())(_op_impl)
    op.register_fake(lambda q, k, v, scale: _out_like(q))
    return op


cpu_attention_op = _register_op()
