"""Compiled CPU convolution kernels as XLA FFI handlers (`conv_ffi.cc`).

Three handlers, used by `conv.conv2d` on the CPU:

- `kernel_grad`: the kernel gradient of any convolution. XLA's CPU backend has no fast kernel for
  it, and the matrix-product form of `conv._kernel_grad_matmul` is held back by how Eigen shares
  small products between two threads. The handler splits the output rows between the threads of
  XLA's intra-op pool, each summing its own register-blocked product.
- `winograd_conv`: a 3x3 stride-1 convolution, dilated or not, by Winograd's F(2x2, 3x3)
  algorithm (2.25x fewer multiply-adds than the direct sum), for the forward pass and the input
  gradient of every such layer, at the direct sum's float32 accuracy (notes in `conv_ffi.cc`);
- `winograd_kernel_grad`: the kernel gradient of those layers by the transposed algorithm,
  F(3x3, 2x2).
What each gained is in benchmarks/README.md ("Kernel gradient on the CPU", "Winograd F(2x2,3x3)
handlers").

The source is compiled on first use, with the machine's C++ compiler (`$CXX`, else `c++`/`g++`)
for the machine's own vector instructions, into a cache keyed by the source, jaxlib, compiler and
CPU (`$NEUROSEG_JAX_CACHE`, else `$XDG_CACHE_HOME/neuroseg_jax` or `~/.cache/neuroseg_jax`), once
per machine. Without a compiler, or if the build fails, a warning says why and `conv2d` keeps the
XLA formulations (same results, slower). `NEUROSEG_JAX_CPU_FFI=0` turns the handlers off.

All three are usable under `jit`, `vmap` and sharding: a batch sharded over mesh axes gives one
call per shard (the kernel gradients then sum over those axes); under `vmap`, the kernel gradients
make one call per element, the Winograd convolution folds the mapped axis into the batch when the
kernel is shared.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

KERNEL_GRAD_TARGET = "neuroseg_conv_kernel_grad"
WINOGRAD_TARGET = "neuroseg_conv_winograd"
WINOGRAD_KERNEL_GRAD_TARGET = "neuroseg_conv_winograd_kernel_grad"
SOURCE = pathlib.Path(__file__).with_name("conv_ffi.cc")
_COMPILE_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")

_lock = threading.Lock()
_state: dict[str, object] = {}  # "available": bool once decided, "library": the loaded ctypes.CDLL


def available() -> bool:
    """Whether the handlers are built and registered (building them on the first call)."""
    with _lock:
        if "available" not in _state:
            _state["available"] = _build_and_register()
        return bool(_state["available"])


def kernel_grad(
    padded_inputs: jax.Array,
    out_grad: jax.Array,
    kernel_size: tuple[int, int],
    strides: tuple[int, int],
    dilation: tuple[int, int],
) -> jax.Array:
    """(kh, kw, Cin, Cout) float32 kernel gradient of a convolution of the padded (N, Hp, Wp, Cin)
    input whose cotangent is `out_grad` (N, Ho, Wo, Cout); CPU only, `available()` must be True."""
    geometry = (*kernel_size, *strides, *dilation)
    return _kernel_grad_call(_kernel_grad_ffi, geometry)(
        padded_inputs.astype(jnp.float32), out_grad.astype(jnp.float32)
    )


def winograd_kernel_grad(
    inputs: jax.Array, out_grad: jax.Array, pad_top_left: tuple[int, int], dilation: tuple[int, int] = (1, 1)
) -> jax.Array:
    """(3, 3, Cin, Cout) float32 kernel gradient of `winograd_conv(inputs, kernel, pad_top_left,
    out_grad.shape[1:3], dilation)` for the cotangent `out_grad` (N, Ho, Wo, Cout), by Winograd's
    F(3x3, 2x2); CPU only, `available()` must be True."""
    return _kernel_grad_call(_winograd_kernel_grad_ffi, (*pad_top_left, *dilation))(
        inputs.astype(jnp.float32), out_grad.astype(jnp.float32)
    )


def winograd_conv(
    inputs: jax.Array,
    kernel: jax.Array,
    pad_top_left: tuple[int, int],
    output_size: tuple[int, int],
    dilation: tuple[int, int] = (1, 1),
) -> jax.Array:
    """(N, Ho, Wo, Cout) float32 3x3 stride-1 cross-correlation of (N, H, W, Cin) `inputs` with the
    (3, 3, Cin, Cout) `kernel` dilated by (dh, dw), the input read as zero outside and shifted by
    `pad_top_left`: out[n, r, s, o] = sum over i, j, c of
    inputs[n, r + dh*i - top, s + dw*j - left, c] * kernel[i, j, c, o]. `output_size` (Ho, Wo) sets
    the bottom and right padding. CPU only, `available()` must be True."""
    geometry = (*pad_top_left, *output_size, *dilation)
    return _winograd_call(geometry)(inputs.astype(jnp.float32), kernel.astype(jnp.float32))


def _kernel_grad_ffi(padded_inputs, out_grad, geometry):
    kh, kw, sh, sw, dh, dw = geometry
    result = jax.ShapeDtypeStruct((kh, kw, padded_inputs.shape[-1], out_grad.shape[-1]), jnp.float32)
    return jax.ffi.ffi_call(KERNEL_GRAD_TARGET, result)(
        padded_inputs, out_grad, sh=np.int64(sh), sw=np.int64(sw), dh=np.int64(dh), dw=np.int64(dw)
    )


def _winograd_kernel_grad_ffi(inputs, out_grad, geometry):
    top, left, dh, dw = geometry
    result = jax.ShapeDtypeStruct((3, 3, inputs.shape[-1], out_grad.shape[-1]), jnp.float32)
    return jax.ffi.ffi_call(WINOGRAD_KERNEL_GRAD_TARGET, result)(
        inputs, out_grad, pt=np.int64(top), pl=np.int64(left), dh=np.int64(dh), dw=np.int64(dw)
    )


def _winograd_ffi(inputs, kernel, geometry):
    top, left, height, width, dh, dw = geometry
    result = jax.ShapeDtypeStruct((inputs.shape[0], height, width, kernel.shape[-1]), jnp.float32)
    return jax.ffi.ffi_call(WINOGRAD_TARGET, result)(
        inputs, kernel, pt=np.int64(top), pl=np.int64(left), dh=np.int64(dh), dw=np.int64(dw)
    )


def _batch_axes(sharding) -> str | tuple[str, ...] | None:
    """The mesh axes the batch (first) dimension is sharded over, or None."""
    if isinstance(sharding, NamedSharding) and len(sharding.spec) and sharding.spec[0] is not None:
        return sharding.spec[0]
    return None


_calls: dict[tuple, jax.custom_batching.custom_vmap] = {}


def _shardable_call(key: tuple, ffi_call, infer_sharding, partition, sharding_rule: str, vmap_rule):
    """ffi_call(a, b) made shardable (`custom_partitioning` with these rules) and vmappable
    (vmap_rule(call, axis_size, in_batched, a, b)); built once per `key`."""
    if key in _calls:
        return _calls[key]
    partitioned = custom_partitioning(ffi_call)
    partitioned.def_partition(
        infer_sharding_from_operands=infer_sharding, partition=partition, sharding_rule=sharding_rule
    )

    @jax.custom_batching.custom_vmap
    def call(a, b):
        return partitioned(a, b)

    call.def_vmap(partial(vmap_rule, call))
    _calls[key] = call
    return call


def _kernel_grad_call(ffi_call, geometry: tuple[int, ...]):
    """ffi_call(inputs, out_grad, geometry), a kernel gradient, for one (static) geometry, made
    shardable and vmappable."""

    def infer_sharding(mesh, arg_shapes, result_shape):
        return NamedSharding(mesh, P())

    def partition(mesh, arg_shapes, result_shape):
        # One call per batch shard and a sum over the batch's mesh axes; any other sharding of the
        # operands is gathered first.
        axes = _batch_axes(arg_shapes[1].sharding)
        operand_sharding = NamedSharding(mesh, P(axes))

        def per_shard(inputs, out_grad):
            partial_sum = ffi_call(inputs, out_grad, geometry)
            return partial_sum if axes is None else lax.psum(partial_sum, axes)

        return mesh, per_shard, NamedSharding(mesh, P()), (operand_sharding, operand_sharding)

    def one_call_per_element(call, axis_size, in_batched, inputs, out_grad):
        return lax.map(lambda pair: call(*pair), _broadcast_unbatched(axis_size, in_batched, (inputs, out_grad))), True

    # The batch factor b appears in neither output dimension: it is summed over.
    return _shardable_call(
        (ffi_call.__name__, geometry),
        lambda x, g: ffi_call(x, g, geometry),
        infer_sharding,
        partition,
        "b h w c, b y x o -> i j c o",
        one_call_per_element,
    )


def _winograd_call(geometry: tuple[int, ...]):
    """The Winograd convolution for one (static) geometry, made shardable and vmappable."""

    def infer_sharding(mesh, arg_shapes, result_shape):
        return NamedSharding(mesh, P(_batch_axes(arg_shapes[0].sharding)))

    def partition(mesh, arg_shapes, result_shape):
        # Each batch shard convolves its own images with the whole kernel; other shardings are gathered.
        batch_sharding = NamedSharding(mesh, P(_batch_axes(arg_shapes[0].sharding)))

        def per_shard(inputs, kernel):
            return _winograd_ffi(inputs, kernel, geometry)

        return mesh, per_shard, batch_sharding, (batch_sharding, NamedSharding(mesh, P()))

    def batched_call(call, axis_size, in_batched, inputs, kernel):
        if not in_batched[1]:
            # A shared kernel: the mapped axis joins the batch.
            if not in_batched[0]:
                return call(inputs, kernel), False
            folded = call(inputs.reshape(-1, *inputs.shape[2:]), kernel)
            return folded.reshape(axis_size, -1, *folded.shape[1:]), True
        return lax.map(lambda pair: call(*pair), _broadcast_unbatched(axis_size, in_batched, (inputs, kernel))), True

    return _shardable_call(
        ("winograd", geometry),
        lambda x, k: _winograd_ffi(x, k, geometry),
        infer_sharding,
        partition,
        "b h w c, i j c o -> b y x o",
        batched_call,
    )


def _broadcast_unbatched(axis_size: int, in_batched, operands: tuple) -> tuple:
    """The operands with a leading mapped axis of `axis_size`, broadcast where they had none."""
    return tuple(
        operand if batched else jnp.broadcast_to(operand, (axis_size, *operand.shape))
        for operand, batched in zip(operands, in_batched)
    )


def _build_and_register() -> bool:
    if os.environ.get("NEUROSEG_JAX_CPU_FFI", "1") == "0":
        return False
    try:
        library_path = _build()
        library = ctypes.cdll.LoadLibrary(str(library_path))
        jax.ffi.register_ffi_target(
            KERNEL_GRAD_TARGET, jax.ffi.pycapsule(library.NeurosegConvKernelGrad), platform="cpu"
        )
        jax.ffi.register_ffi_target(WINOGRAD_TARGET, jax.ffi.pycapsule(library.NeurosegConvWinograd), platform="cpu")
        jax.ffi.register_ffi_target(
            WINOGRAD_KERNEL_GRAD_TARGET, jax.ffi.pycapsule(library.NeurosegConvKernelGradWinograd), platform="cpu"
        )
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        warnings.warn(
            f"neuroseg_jax: the compiled CPU convolution kernels (conv_ffi) are unavailable ({error}); "
            f"using XLA's formulation (same results, slower). Set NEUROSEG_JAX_CPU_FFI=0 to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    _state["library"] = library
    return True


def find_compiler() -> str | None:
    """Path of the C++ compiler the handlers are built with ($CXX, c++, g++ or clang++), or None."""
    for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def _cpu_description() -> str:
    """What -march=native compiles for: the CPU's feature flags where Linux lists them."""
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    flags = [line for line in lines if line.startswith(("flags", "Features"))]
    return flags[0] if flags else platform.processor() or platform.machine()


def _cache_dir() -> pathlib.Path:
    if os.environ.get("NEUROSEG_JAX_CACHE"):
        return pathlib.Path(os.environ["NEUROSEG_JAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "neuroseg_jax"


def _build() -> pathlib.Path:
    """Path of the compiled handlers' library, compiling it unless the cache has it."""
    compiler = find_compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found ($CXX, c++, g++ or clang++)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), importlib.metadata.version("jaxlib").encode(), compiler.encode(), version.encode(),
                 _cpu_description().encode(), " ".join(_COMPILE_FLAGS).encode()):
        key.update(part)
        key.update(b"\0")
    cache = _cache_dir()
    library_path = cache / f"conv_ffi-{key.hexdigest()[:20]}.so"
    if library_path.exists():
        return library_path
    cache.mkdir(parents=True, exist_ok=True)
    # Compiled under a temporary name and renamed, so concurrent processes never load a partial file.
    handle, temporary = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(handle)
    try:
        command = [compiler, *_COMPILE_FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", temporary]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"`{' '.join(command)}` failed: {result.stderr.strip()[-2000:]}")
        os.replace(temporary, library_path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return library_path
