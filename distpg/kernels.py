"""CPU fast paths for the decode step: C kernels for the one-query attention over the KV cache and the tanh
GELU, and oneDNN matrix products on pre-packed weights.

On a CPU, PyTorch runs a decode step's attention as several elementwise passes with temporaries the size of
the cache, and its tanh is scalar. `csrc/decode.c` does each in one vectorised pass (float32 and bfloat16).
It is compiled here on first use with the machine's C compiler (`$CC`, else `cc`), for the machine's own
CPU (`-march=native`), into a per-user cache keyed by the source, the compiler and the CPU, and loaded with
ctypes: no build step at install, no Python headers, and each node of a cluster builds for its own CPU.

A freshly loaded library must reproduce PyTorch's result on a small case before it is used. Without a
compiler, or when the build or that check fails, the model keeps PyTorch's ops and a warning says why: the
samples are then the same up to float rounding, only slower. `rollout.cpu_kernels: false` (see
`distpg.rollout`) turns the kernels off in a worker; `status()` says which path a process takes.

The kernels serve forwards without autograd only: the sampler's decode steps, and the GELU of any forward
that needs no gradient (the learner's frozen reference policy for `algo.kl_coef`). Training forwards keep
PyTorch's ops.

Pre-packed weights (`packed_weights`, `linear`): a decode step multiplies a few dozen rows by every weight
matrix, and `F.linear` lets the BLAS re-lay each weight out into its own blocked format on every call (for
the output layer, the vocabulary-sized embedding: 51 MB per token at GPT-2's vocabulary and 4x256). Inside
`packed_weights(...)`, the no-grad CPU products of the given weights run on oneDNN (PyTorch's own CPU
library, the ops `torch.compile` emits for frozen CPU models) against copies laid out once per weight
version, with the c_fc GELU fused into its product; on an Intel CPU, float32 weights are instead copied
transposed, (in, out) as transformers' Conv1D stores them, for one BLAS call without a transpose (MKL's sgemm
ran faster there; see `FLOAT32_LAYOUT`). Governed by the same switch (`rollout.cpu_kernels`), checked against
`F.linear` before first use, and skipped with a warning where oneDNN is missing.

The float32 decode step in one call (`DecodeStep`, `decode_step_in_c`): with the transposed layout, the
sampler's whole per-token step up to the final layer norm runs in C, calling for its products the sgemm that
PyTorch's CPU library exports (MKL's on x86: the same call, hence the same numbers, as `torch.addmm`), so
that a token costs one return to Python instead of a few dozen operator calls.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: builds are not serialised
    fcntl = None

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "decode.c"
# -fno-trapping-math and -fno-math-errno let the compiler vectorise floor and the exp polynomial (PyTorch
# itself is built with the former); -fopenmp-simd reads the `omp simd` hints without linking an OpenMP runtime
FLAGS = ["-O3", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared", "-std=c99"]
# tried in order: the machine's own CPU, then portable code
ARCH_FLAGS = (["-march=native"], ["-mcpu=native"], [])
COMPILE_TIMEOUT_S = 120.0
_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_status = "not loaded yet"
_tried = False
enabled = True  # rollout.cpu_kernels; a process-wide switch set by the rollout worker


def cache_dir() -> Path:
    """Where built libraries are kept: $DISTPG_CACHE_DIR, else $XDG_CACHE_HOME/distpg, else ~/.cache/distpg."""
    root = os.environ.get("DISTPG_CACHE_DIR")
    if root:
        return Path(root) / "kernels"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "distpg" / "kernels"


def compiler() -> str | None:
    """The C compiler: $CC, else the one Python was built with, else `cc`; None if none is on PATH."""
    for cand in (os.environ.get("CC"), (sysconfig.get_config_var("CC") or "").split(" ")[0], "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU's model and feature flags (Linux), else what platform knows."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        keep = [ln for ln in text.splitlines()[:40] if ln.split(":")[0].strip() in ("vendor_id", "model name", "flags",
                                                                                    "Features", "CPU part")]
        if keep:
            return "\n".join(keep)
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _safe_folder(folder: Path) -> None:
    """Create `folder` (0700) if needed and refuse it unless this user owns it and nobody else may write to
    it: a library found there is loaded into every worker."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = folder.stat()
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise OSError(f"{folder} belongs to another user")
    if st.st_mode & 0o022:
        raise OSError(f"{folder} is writable by other users (chmod go-w it)")


def _build(cc: str, rebuild: bool = False) -> Path:
    """The library for this machine: from the cache, else compiled into it (with `rebuild`, compiled again
    over a cached file that would not load). One process compiles while the others wait on a lock file; a
    compiler error is remembered next to the cache (`decode-KEY.failed`: delete it to try again)."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, errors="replace", timeout=30).stdout
    # the cache key of each set of flags: the source, the compiler, the flags and the CPU
    base = b"\0".join((SOURCE.read_bytes(), cc.encode(), version.encode(), _cpu_identity().encode()))
    keys = [hashlib.sha256(base + b"\0" + " ".join(FLAGS + arch).encode()).hexdigest()[:16] for arch in ARCH_FLAGS]
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    errors = []
    for folder in (cache_dir(), Path(tempfile.gettempdir()) / f"distpg-kernels-{uid}"):
        try:
            _safe_folder(folder)
        except OSError as e:
            errors.append(str(e))
            continue
        with open(folder / "build.lock", "a") as lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
            for arch, key in zip(ARCH_FLAGS, keys):
                flags = FLAGS + arch
                target, failed = folder / f"decode-{key}.so", folder / f"decode-{key}.failed"
                if target.exists() and not rebuild:
                    return target
                if failed.exists():
                    errors.append(f"{' '.join(arch) or 'portable'}: failed before, see {failed}")
                    continue
                fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
                os.close(fd)
                try:
                    done = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True,
                                          text=True, errors="replace", timeout=COMPILE_TIMEOUT_S)
                    if done.returncode == 0:
                        with open(tmp, "rb") as f:
                            os.fsync(f.fileno())  # whole on disk before it takes the cached name
                        os.replace(tmp, target)
                        return target
                    failed.write_text(f"{cc} {' '.join(flags)}\n{done.stderr}")
                    errors.append(f"{' '.join(arch) or 'portable'}: {done.stderr.strip()[-300:]}")
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
        break  # the folder was usable: the compiler is what failed
    raise RuntimeError("; ".join(errors) or "no usable cache folder")


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    for suffix in _DTYPES.values():
        fn = getattr(lib, f"distpg_decode_attention_{suffix}")
        fn.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, i64, ptr, i64, f32, ptr, i64]
        fn.restype = None
        fn = getattr(lib, f"distpg_gelu_tanh_{suffix}")
        fn.argtypes = [ptr, i64]
        fn.restype = None
    lib.distpg_decode_step_f32.argtypes = [ptr, ptr, ptr, i64, ptr, ptr, i64, i64, i64, ptr, ptr, ptr, i64, i64, i64,
                                           i64, i64, ptr, i64, f32, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr]
    lib.distpg_decode_step_f32.restype = None
    lib.distpg_transpose_f32.argtypes = [ptr, ptr, i64, i64]
    lib.distpg_transpose_f32.restype = None


def _self_check(lib: ctypes.CDLL) -> None:
    """The library against PyTorch on a small padded case, both dtypes, with and without writing the new key and
    value; raises if they disagree."""
    from distpg.model import _decode_attention_torch

    g = torch.Generator().manual_seed(0)
    mask = torch.ones(3, 1, 1, 7, dtype=torch.bool)
    mask[0, ..., :2] = False
    x = torch.linspace(-8, 8, 101)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        for D in (32, 24):  # a head size with its own unrolled branch, and one with a remainder
            k, v = torch.randn(2, 7, 3, 2, D, generator=g).to(dtype).unbind(0)  # (S, B, H, D)
            qkv = torch.randn(3, 3 * 2 * D, generator=g).to(dtype)  # the new position's q, k, v of each row
            q, new_k, new_v = (t.view(3, 2, D) for t in qkv.split(2 * D, dim=1))
            k_new, v_new = k.clone(), v.clone()
            got_new = _attention(lib, q, k_new, v_new, mask, knew=2 * D)  # writes the last position first
            k[-1], v[-1] = new_k, new_v
            got = _attention(lib, q, k, v, mask)
            ref = _decode_attention_torch(q.double(), k.double(), v.double(), mask)
            if (got is None or not torch.allclose(got.double(), ref, atol=tol, rtol=tol)
                    or not (torch.equal(k_new, k) and torch.equal(v_new, v) and torch.equal(got_new, got))):
                raise RuntimeError(f"the built decode_attention ({dtype}, D={D}) disagrees with PyTorch")
        y = x.to(dtype, copy=True)
        _gelu(lib, y)
        if not torch.allclose(y.double(), torch.nn.functional.gelu(x.double(), approximate="tanh"), atol=tol, rtol=tol):
            raise RuntimeError(f"the built gelu_tanh ({dtype}) disagrees with PyTorch")


def load() -> ctypes.CDLL | None:
    """The kernels' library, built and checked on first call; None where they are unavailable (logged once)."""
    global _lib, _status, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        cc = compiler()
        if cc is None:
            _status = "off: no C compiler on PATH (set CC)"
        else:
            for attempt in range(2):
                try:
                    path = _build(cc, rebuild=attempt > 0)
                    lib = ctypes.CDLL(str(path))
                    _declare(lib)
                    _self_check(lib)
                    _lib, _status = lib, f"C ({path})"
                    break
                except Exception as e:  # noqa: BLE001 - whatever goes wrong, sampling falls back to PyTorch
                    _status = f"off: {type(e).__name__}: {e}" if not isinstance(e, RuntimeError) else f"off: {e}"
                    # a cached file that does not load or check (truncated, stale) is compiled once more
        _tried = True
        if _lib is None:
            log.warning("distpg: CPU decode kernels unavailable, sampling with PyTorch ops (slower on a CPU): %s",
                        _status.removeprefix("off: "))
        return _lib


def status() -> str:
    """Which paths this process's CPU decode steps take: 'C (library)' or 'off: why' for the C kernels, then
    the matrix products' ('; matmuls: oneDNN pre-packed', with ', float32 transposed for the BLAS' where
    `float32_layout()` says so, then ', the float32 decode step in one C call' where `DecodeStep` can run, or
    '; matmuls: PyTorch (why)'); or 'disabled'."""
    if not enabled:
        return "disabled (rollout.cpu_kernels: false)"
    lib = load()
    why = packing_unavailable(torch.float32)
    layout = ""
    if float32_layout() == "transposed":
        layout = ", float32 transposed for the BLAS" + (
            ", the float32 decode step in one C call" if lib is not None and torch_sgemm() is not None
            else " (no sgemm found in PyTorch's library: the decode step in PyTorch's ops)" if lib is not None else "")
    return f"{_status}; matmuls: " + (f"oneDNN pre-packed{layout}" if why is None else f"PyTorch ({why})")


def _usable(*tensors: torch.Tensor) -> ctypes.CDLL | None:
    t = tensors[0]
    if not enabled or t.device.type != "cpu" or t.dtype not in _DTYPES or torch.is_grad_enabled() and any(
            x.requires_grad for x in tensors):
        return None
    if any(x.dtype != t.dtype for x in tensors):
        return None
    return load()


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     attn_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The one-query decode attention (`distpg.model._decode_attention_torch`) in C: q (B, H, D), k, v
    (S, B, H, D) with the same strides and D contiguous, attn_mask bool broadcastable to (B, 1, 1, S) or None.
    Returns (B, H, D), or None where the kernel does not apply (not CPU float32/bfloat16, autograd on, another
    layout, or no library)."""
    lib = _usable(q, k, v)
    return None if lib is None else _attention(lib, q, k, v, attn_mask)


def decode_attention_new(qkv: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         attn_mask: torch.Tensor | None) -> torch.Tensor | None:
    """`decode_attention` for a new token: qkv (B, 3C) holds each row's query, key and value side by side
    (C = H D, C contiguous); its key and value are written into k and v (S, B, H, D) at position S - 1, then
    the query attends over all S. Returns (B, H, D), or None, with nothing written, where the kernel does not
    apply."""
    S, B, H, D = k.shape
    if qkv.dim() != 2 or qkv.shape != (B, 3 * H * D) or qkv.stride(-1) != 1:
        return None
    lib = _usable(qkv, k, v)
    return None if lib is None else _attention(lib, qkv[:, : H * D].view(B, H, D), k, v, attn_mask, knew=H * D)


def gelu_tanh_(x: torch.Tensor) -> bool:
    """GPT-2's tanh GELU in place on a contiguous CPU float32/bfloat16 tensor; False (x untouched) where the
    kernel does not apply."""
    lib = _usable(x)
    return lib is not None and _gelu(lib, x)


def _attention(lib, q, k, v, attn_mask, knew=0):
    S, B, H, D = k.shape
    if (k.stride() != v.stride() or k.shape != v.shape or k.stride(-1) != 1 or q.stride(-1) != 1
            or q.shape != (B, H, D) or S == 0
            or attn_mask is not None and attn_mask.dtype != torch.bool):
        return None
    mask, mask_stride = None, 0
    if attn_mask is not None:
        mask = attn_mask.expand(B, 1, 1, S)[:, 0, 0]  # (B, S): bool is one byte, 0 or 1
        if mask.stride(-1) != 1:
            mask = mask.contiguous()
        mask_stride = mask.stride(0)
    out = torch.empty((B, H, D), dtype=q.dtype)
    scratch = torch.empty(16 * S + 2 * D, dtype=torch.float32)  # 16: the C kernel's largest group of pairs
    fn = getattr(lib, f"distpg_decode_attention_{_DTYPES[q.dtype]}")
    fn(q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), v.data_ptr(), out.data_ptr(), B, H, D, S,
       k.stride(0), k.stride(1), k.stride(2), None if mask is None else mask.data_ptr(), mask_stride, D ** -0.5,
       scratch.data_ptr(), knew)
    return out


def _gelu(lib, x) -> bool:
    if not x.is_contiguous():
        return False
    getattr(lib, f"distpg_gelu_tanh_{_DTYPES[x.dtype]}")(x.data_ptr(), x.numel())
    return True


# ------------------------------------------------------------------------- pre-packed matrix products

# float32 weights with fewer elements than this stay on F.linear in oneDNN's layout (the transposed one takes
# every size: no fixed cost over F.linear, and the decode step in C needs every weight). Measured in 64-row
# decode loops on this project's 2-core EPYC: oneDNN's fixed cost per call (12-17 us more than F.linear's)
# outweighs what the layout saves at the tiny preset's sizes (up to 64x256, 16,384 elements: its generation
# 1.3x faster on F.linear), and the layout pays from 256x256 (65,536) up; in bfloat16 it paid at every size
# measured (64x192 up)
PACK_MIN_FLOAT32 = 1 << 15
# float32 weights' layout: "onednn" (oneDNN's blocked format, its GELU fused into the product) or "transposed"
# (an (in, out) copy multiplied by PyTorch's BLAS without a transpose: MKL's sgemm on x86); None: by the CPU,
# "transposed" on Intel, where a generation took 7-18% less time with MKL's products (a 2-core Xeon with AMX),
# "onednn" elsewhere (AMD EPYC: 1.12-1.49x over F.linear; there the transposed layout, with the decode step in one
# C call, took 1.65-1.93x oneDNN's time per generation at the sampler bench's tiny, small and small-charvocab sizes,
# one thread, best of 7 alternating). bfloat16 weights always go to oneDNN.
FLOAT32_LAYOUT: str | None = None
_PACK_OK: dict[torch.dtype, str | None] = {}  # dtype -> None (usable) or why not, decided once per process
_packs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # owner -> _Packs
_packs_lock = threading.Lock()
_SPARE = object()  # the key of an owner's memory kept without valid copies (`release(keep_memory=True)`)
_active = threading.local()  # .packs: {id(weight): packed weight} inside `packed_weights`, else absent/None


def packing_unavailable(dtype: torch.dtype) -> str | None:
    """None if oneDNN's pre-packed products serve `dtype` here (checked against `F.linear` on first call),
    else why not."""
    if dtype not in _PACK_OK:
        with _lock:
            if dtype not in _PACK_OK:
                _PACK_OK[dtype] = _check_packing(dtype)
                if _PACK_OK[dtype] is not None:
                    log.warning("distpg: pre-packed %s matrix products unavailable, sampling with F.linear: %s",
                                dtype, _PACK_OK[dtype])
    return _PACK_OK[dtype]


def _check_packing(dtype: torch.dtype) -> str | None:
    if dtype not in _DTYPES:
        return f"{dtype} is not float32 or bfloat16"
    try:
        ops = torch.ops.mkldnn
        if not torch.backends.mkldnn.is_available():
            return "this PyTorch has no oneDNN (mkldnn)"
        if dtype == torch.bfloat16 and not ops._is_mkldnn_bf16_supported():
            return "oneDNN has no bfloat16 on this CPU"
        g = torch.Generator().manual_seed(0)
        w, b = torch.randn(40, 24, generator=g), torch.randn(40, generator=g)
        x = torch.randn(3, 2, 24, generator=g)
        packed = ops._reorder_linear_weight(w.to(dtype), 4)  # packed for 4 rows, used with 6
        ref = torch.nn.functional.linear(x.double(), w.double(), b.double())
        tol = 1e-4 if dtype == torch.float32 else 6e-2
        for act, want in (("none", ref), ("gelu", torch.nn.functional.gelu(ref, approximate="tanh"))):
            got = ops._linear_pointwise(x.to(dtype), packed, b.to(dtype), act, [], "tanh" if act == "gelu" else "")
            if got.shape != want.shape or not torch.allclose(got.double(), want, atol=tol, rtol=tol):
                return f"oneDNN's packed product ({act}) disagrees with F.linear"
    except Exception as e:  # noqa: BLE001 - an op missing or refused in this PyTorch build: F.linear it is
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


@contextmanager
def packed_weights(owner: object, weights: Sequence[torch.Tensor], key: object, rows: int) -> Iterator[None]:
    """Within this block, `linear` multiplies by pre-packed copies of `weights` (2-d, out x in) in this thread.

    The copies are kept (beside `owner`, while it lives: any object that takes a weak reference, such as
    the model) for the next block with the same `key` and the same weight tensors; another `key` packs them
    again. The caller changes `key` whenever the weights' values change (the rollout worker passes its policy
    version); `key=None` packs for this block only. `rows` is the batch the layout is chosen for (any batch
    works). Small float32 weights are left to `F.linear` (`PACK_MIN_FLOAT32`). A no-op unless the kernels are
    enabled, the weights are CPU float32/bfloat16, and oneDNN passed its check.
    """
    w0 = weights[0]
    if float32_layout() == "onednn":
        weights = [w for w in weights if w.dtype != torch.float32 or w.numel() >= PACK_MIN_FLOAT32]
    if (not enabled or not weights or w0.device.type != "cpu" or w0.requires_grad and torch.is_grad_enabled()
            or packing_unavailable(w0.dtype) is not None):
        yield
        return
    ptrs = tuple((w.data_ptr(), w.dtype, tuple(w.shape)) for w in weights)
    with _packs_lock:
        entry = _packs.get(owner)
        if entry is None or key is None or entry.key != key or entry.ptrs != ptrs:
            spare = None
            if entry is not None:  # the old copies go before the new ones are made, into their memory if unused
                del _packs[owner]
                if entry.users == 0:
                    spare, entry.buffer = entry.buffer, None
            entry = None
        if entry is not None:
            entry.users += 1
    if entry is None:
        with torch.no_grad():
            packed, buffer = _pack_all([w.detach() for w in weights], rows, spare)
        entry = _Packs(key, ptrs, packed, buffer, users=1)
        if key is not None:
            with _packs_lock:
                _packs[owner] = entry
    try:
        with using_packs({id(w): p for w, p in zip(weights, entry.packed)}):
            yield
    finally:
        with _packs_lock:
            entry.users -= 1


@dataclass
class _Packs:
    """An owner's pre-packed copies: made for `key` from the weights at `ptrs`; the transposed ones live in
    `buffer` (None if none), which the next key's copies reuse once no block (`users`) multiplies by these."""

    key: object
    ptrs: tuple
    packed: list[torch.Tensor]
    buffer: torch.Tensor | None
    users: int = 0


def active_packs() -> dict | None:
    """The pre-packed copies `linear` uses in this thread (inside `packed_weights`), for `using_packs`."""
    return getattr(_active, "packs", None)


@contextmanager
def using_packs(packs: dict | None) -> Iterator[None]:
    """Within this block, this thread's `linear` uses `packs` (another thread's `active_packs`)."""
    outer = getattr(_active, "packs", None)
    _active.packs = packs
    try:
        yield
    finally:
        _active.packs = outer


def release(owner: object, keep_memory: bool = False) -> None:
    """Drop the pre-packed copies kept for `owner` (a rollout worker does when its weights change, so that a
    version's copies do not outlive it). With `keep_memory`, the transposed copies' memory stays for the next
    ones (unless a block is multiplying by them): a worker's next version is packed into it, with no fresh
    pages to fault in (GPT-2 124M: ~470 MB per version)."""
    with _packs_lock:
        entry = _packs.pop(owner, None)
        if keep_memory and entry is not None and entry.users == 0 and entry.buffer is not None:
            _packs[owner] = _Packs(_SPARE, (), [], entry.buffer)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           gelu: bool = False) -> torch.Tensor | None:
    """`F.linear(x, weight, bias)` (then GPT-2's tanh GELU with `gelu`) on `weight`'s pre-packed copy inside
    `packed_weights`; None where that does not apply (no pack of this weight active, autograd on for any
    operand, or `x` not of the weight's dtype)."""
    packs = getattr(_active, "packs", None)
    if packs is None or torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                     or bias is not None and bias.requires_grad):
        return None
    packed = packs.get(id(weight))
    if packed is None or x.dtype != packed.dtype:
        return None
    if packed.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "gelu" if gelu else "none", [],
                                                  "tanh" if gelu else "")
    # the (in, out) copy: one BLAS call without a transpose, then the GELU in place (C, else PyTorch's)
    rows = x.reshape(-1, x.shape[-1])
    out = (rows @ packed if bias is None else torch.addmm(bias, rows, packed)).view(*x.shape[:-1], packed.shape[1])
    if gelu and not gelu_tanh_(out):
        out = torch.nn.functional.gelu(out, approximate="tanh")
    return out


def float32_layout() -> str:
    """How float32 weights are laid out for the sampler's products: FLOAT32_LAYOUT, or by the CPU's vendor."""
    if FLOAT32_LAYOUT is not None:
        return FLOAT32_LAYOUT
    return "transposed" if _intel() else "onednn"


@functools.cache
def _intel() -> bool:
    return "GenuineIntel" in _cpu_identity()


ALIGN_FLOATS = 16  # each transposed copy starts on a 64-byte cache line


def _pack_all(weights: Sequence[torch.Tensor], rows: int,
              spare: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Each of `weights` (out, in) laid out for `linear`: transposed for the BLAS (float32 where
    `float32_layout()` says so), else in oneDNN's blocked format for `rows`-row products; and the buffer the
    transposed copies share (None if there are none): `spare` where it is large enough, else a new one.

    The transposed copies are written by the C library's tiled transpose where it is built (PyTorch's copy of
    a transposed view otherwise). GPT-2 124M's 49 matrices, one thread: ~170-220 ms into a reused buffer,
    against 350-640 ms for a fresh copy of each (half of it faulting in new pages), once per policy version."""
    transposed = [w.dtype == torch.float32 and float32_layout() == "transposed" for w in weights]
    sizes = [-(-w.numel() // ALIGN_FLOATS) * ALIGN_FLOATS if t else 0 for w, t in zip(weights, transposed)]
    need = sum(sizes) + ALIGN_FLOATS
    buffer = None
    if any(transposed):
        buffer = spare if spare is not None and spare.numel() >= need else torch.empty(need)
    offset = -buffer.data_ptr() // 4 % ALIGN_FLOATS if buffer is not None else 0
    lib = load() if buffer is not None else None
    packed = []
    for w, t, size in zip(weights, transposed, sizes):
        if not t:
            packed.append(torch.ops.mkldnn._reorder_linear_weight(w, max(1, rows)))
            continue
        w = w.contiguous()
        out = buffer[offset : offset + w.numel()].view(w.shape[1], w.shape[0])
        offset += size
        if lib is not None:
            lib.distpg_transpose_f32(w.data_ptr(), out.data_ptr(), w.shape[0], w.shape[1])
        else:
            out.copy_(w.t())
        packed.append(out)
    return packed, buffer


# ------------------------------------------------------------------------- the float32 decode step in one call

_sgemm: list[int | None] = []  # [address]: PyTorch's own sgemm, looked up and checked once per process


def torch_sgemm() -> int | None:
    """The address of the BLAS sgemm (Fortran interface) that PyTorch's float32 CPU products call, exported by
    its CPU library (MKL's in the x86 wheels); None where it is not exported or disagrees with `torch.mm` on a
    small product. The C decode step calls it, as `torch.addmm` would, without a return to Python."""
    if not _sgemm:
        with _lock:
            if not _sgemm:
                _sgemm.append(_find_sgemm())
    return _sgemm[0]


def _find_sgemm() -> int | None:
    folder = Path(torch.__file__).parent / "lib"
    for path in sorted(folder.glob("libtorch_cpu.*")):
        try:
            fn = ctypes.CDLL(str(path)).sgemm_
        except (OSError, AttributeError):
            continue
        g = torch.Generator().manual_seed(0)
        x, w, y = torch.randn(3, 5, generator=g), torch.randn(5, 4, generator=g), torch.zeros(3, 4)
        i32, f32 = ctypes.c_int, ctypes.c_float
        m, n, k, one, zero = i32(4), i32(3), i32(5), f32(1.0), f32(0.0)
        ref = ctypes.byref
        fn(b"N", b"N", ref(m), ref(n), ref(k), ref(one), ctypes.c_void_p(w.data_ptr()), ref(m),
           ctypes.c_void_p(x.data_ptr()), ref(k), ref(zero), ctypes.c_void_p(y.data_ptr()), ref(m))
        if torch.allclose(y, x @ w, atol=1e-5, rtol=1e-5):
            return ctypes.cast(fn, ctypes.c_void_p).value
        log.warning("distpg: %s's sgemm_ disagrees with torch.mm; the decode step keeps PyTorch's ops", path.name)
    return None


class DecodeStep:
    """`distpg.model.decode_step` up to the final layer norm, float32 on a CPU, in one call of the C library
    (`distpg_decode_step_f32`): the sampler's per-token loop returns to Python once per token instead of a few
    dozen times. Built once per generation by `decode_step_in_c`; its work space is sized for `rows` rows (a
    generation's rows only ever shrink). Calling it returns the final layer norm's output (b, C), a view of
    that work space valid until the next call."""

    def __init__(self, lib: ctypes.CDLL, gemm: int, wte: torch.Tensor, wpe: torch.Tensor,
                 blocks: Sequence[Sequence[torch.Tensor | None]], ln_f: tuple[torch.Tensor, torch.Tensor],
                 eps: float, n_head: int, rows: int) -> None:
        C = wte.shape[1]
        self._fn, self._gemm, self._eps = lib.distpg_decode_step_f32, gemm, eps
        self._keep = (wte, wpe, blocks, ln_f)  # what the addresses below point into
        self._ln_f = (ln_f[0].data_ptr(), ln_f[1].data_ptr())
        self._params = torch.tensor([0 if t is None else t.data_ptr() for b in blocks for t in b], dtype=torch.int64)
        self._work = [torch.empty(rows, n) for n in (C, C, C, 3 * C, 4 * C)]  # x, a, b, qkv, hid
        self._work_ptrs = [t.data_ptr() for t in self._work]
        self._ptrs = [wte.data_ptr(), wpe.data_ptr(), C, n_head, len(blocks), self._params.data_ptr()]
        self._shape = (len(blocks), n_head, C // n_head)  # a cache's (n_layer, ., H, ., D)

    def __call__(self, tok: torch.Tensor, positions: torch.Tensor, attn_mask: torch.Tensor | None,
                 cache_k: torch.Tensor, cache_v: torch.Tensor, pos: int) -> torch.Tensor:
        """tok, positions (b,) int64; attn_mask bool broadcastable to (b, 1, 1, pos + 1) or None; cache_k, cache_v
        (n_layer, b, H, T_max, D); pos: the new token's cache position."""
        b, S = tok.shape[0], pos + 1
        L, H, D = self._shape
        # what the C code takes on trust (it reads and writes by these shapes and strides)
        if (b > self._work[0].shape[0] or positions.shape != (b,) or tok.dtype != torch.int64
                or positions.dtype != torch.int64 or cache_k.shape != cache_v.shape
                or cache_k.stride() != cache_v.stride() or cache_k.dim() != 5 or cache_k.stride(-1) != 1
                or (cache_k.shape[0], cache_k.shape[1], cache_k.shape[2], cache_k.shape[4]) != (L, b, H, D)
                or not S <= cache_k.shape[3] or cache_k.dtype != torch.float32):
            raise ValueError(f"DecodeStep: {b} rows (at most {self._work[0].shape[0]}), a cache of shape "
                             f"{tuple(cache_k.shape)} (wanted ({L}, {b}, {H}, >= {S}, {D}) float32, D contiguous)")
        tok, positions = tok.contiguous(), positions.contiguous()
        mask, msb = None, 0
        if attn_mask is not None:
            m = attn_mask.expand(b, 1, 1, S)[:, 0, 0]
            m = m if m.stride(-1) == 1 else m.contiguous()
            mask, msb = m.data_ptr(), m.stride(0)
        sl, sb, sh, ss, _ = cache_k.stride()
        scratch = torch.empty(16 * S + 2 * D)
        self._fn(self._gemm, tok.data_ptr(), positions.data_ptr(), b, *self._ptrs, cache_k.data_ptr(),
                 cache_v.data_ptr(), sl, ss, sb, sh, S, mask, msb, self._eps, *self._ln_f, *self._work_ptrs,
                 scratch.data_ptr())
        return self._work[1][:b]  # a: the final layer norm's output


def decode_step_in_c(wte: torch.Tensor, wpe: torch.Tensor, layers: Sequence[Sequence[torch.Tensor]],
                     ln_f: tuple[torch.Tensor, torch.Tensor], eps: float, n_head: int, rows: int) -> DecodeStep | None:
    """A `DecodeStep` for these parameters (`distpg.model.decode_layers`' order) inside `packed_weights`, or None
    where it does not apply: the kernels off or not built, not CPU float32 without autograd, a block's weight
    not laid out transposed (`float32_layout()`), or no usable sgemm."""
    packs = active_packs()
    if packs is None or not enabled or _usable(wte, wpe) is None or wte.dtype != torch.float32:
        return None
    blocks, C = [], wte.shape[1]
    for layer in layers:
        block = list(layer)
        # the four weight matrices: their (in, out) copies, in the shapes the C step assumes
        for i, shape in ((2, (C, 3 * C)), (4, (C, C)), (8, (C, 4 * C)), (10, (4 * C, C))):
            w = packs.get(id(layer[i]))
            if w is None or w.is_mkldnn or w.dtype != torch.float32 or not w.is_contiguous() or w.shape != shape:
                return None
            block[i] = w
        if any(block[i] is None for i in (0, 1, 6, 7)) or any(
                t is not None and (t.dtype != torch.float32 or not t.is_contiguous()) for t in block):
            return None
        blocks.append(block)
    gemm, lib = torch_sgemm(), load()
    if gemm is None or lib is None or not (wte.is_contiguous() and wpe.is_contiguous()):
        return None
    return DecodeStep(lib, gemm, wte, wpe, blocks, ln_f, eps, n_head, rows)
