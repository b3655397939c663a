"""The CPU convolution kernel gradient as a compiled XLA FFI handler (`conv_ffi.cc`).

On the CPU, XLA has no fast kernel for a convolution's kernel gradient (issue 8): its own form runs
at 4-60 GFLOP/s, and the matrix-product form of `conv._kernel_grad_matmul` is held back by how
Eigen shares small products between two threads (114 GFLOP/s over the benchmark U-Net's layers on
the 2-core EPYC, against 169 for PyTorch's oneDNN). The handler splits the output rows between the
threads of XLA's intra-op pool, each summing its own register-blocked product, and reaches
160-190 GFLOP/s on 16x16 to 512x768 maps with 32 to 1024 channels (oneDNN's own backward-weights
kernel: ~170); the benchmark U-Net's training step went from 4.8-4.9 to 4.2 s.

The source is compiled on first use, with the machine's C++ compiler (`$CXX`, else `c++`/`g++`)
for the machine's own vector instructions, into a cache keyed by the source, jaxlib, compiler and
CPU (`$NEUROSEG_JAX_CACHE`, else `$XDG_CACHE_HOME/neuroseg_jax` or `~/.cache/neuroseg_jax`); that
takes a few seconds once per machine. Without a compiler, or if the build fails, a warning says
why and `conv2d` keeps the XLA formulation (same results, slower). `NEUROSEG_JAX_CPU_FFI=0` turns
the handler off.

`kernel_grad` is usable under `jit`, `vmap` (one call per vmapped element) and sharding: a batch
sharded over mesh axes gives one call per shard and a sum over those axes.
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

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

TARGET = "neuroseg_conv_kernel_grad"
SOURCE = pathlib.Path(__file__).with_name("conv_ffi.cc")
_COMPILE_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")

_lock = threading.Lock()
_state: dict[str, object] = {}  # "available": bool once decided, "library": the loaded ctypes.CDLL


def available() -> bool:
    """Whether the handler is built and registered (building it on the first call)."""
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
    return _call_for(geometry)(padded_inputs.astype(jnp.float32), out_grad.astype(jnp.float32))


def _ffi_call(padded_inputs, out_grad, geometry):
    kh, kw, sh, sw, dh, dw = geometry
    result = jax.ShapeDtypeStruct((kh, kw, padded_inputs.shape[-1], out_grad.shape[-1]), jnp.float32)
    return jax.ffi.ffi_call(TARGET, result)(
        padded_inputs, out_grad, sh=np.int64(sh), sw=np.int64(sw), dh=np.int64(dh), dw=np.int64(dw)
    )


def _batch_axes(sharding) -> str | tuple[str, ...] | None:
    """The mesh axes the batch (first) dimension is sharded over, or None."""
    if isinstance(sharding, NamedSharding) and len(sharding.spec) and sharding.spec[0] is not None:
        return sharding.spec[0]
    return None


_calls: dict[tuple[int, ...], jax.custom_batching.custom_vmap] = {}


def _call_for(geometry: tuple[int, ...]):
    """The FFI call for one (static) geometry, made shardable and vmappable; built once per geometry."""
    if geometry in _calls:
        return _calls[geometry]

    def infer_sharding(mesh, arg_shapes, result_shape):
        return NamedSharding(mesh, P())

    def partition(mesh, arg_shapes, result_shape):
        # One call per batch shard and a sum over the batch's mesh axes; any other sharding of the
        # operands is gathered first.
        axes = _batch_axes(arg_shapes[1].sharding)
        operand_sharding = NamedSharding(mesh, P(axes))

        def per_shard(padded_inputs, out_grad):
            partial_sum = _ffi_call(padded_inputs, out_grad, geometry)
            return partial_sum if axes is None else lax.psum(partial_sum, axes)

        return mesh, per_shard, NamedSharding(mesh, P()), (operand_sharding, operand_sharding)

    partitioned = custom_partitioning(lambda x, g: _ffi_call(x, g, geometry))
    # The batch factor b appears in neither output dimension: it is summed over.
    partitioned.def_partition(
        infer_sharding_from_operands=infer_sharding, partition=partition, sharding_rule="b h w c, b y x o -> i j c o"
    )

    @jax.custom_batching.custom_vmap
    def call(padded_inputs, out_grad):
        return partitioned(padded_inputs, out_grad)

    @call.def_vmap
    def one_call_per_element(axis_size, in_batched, padded_inputs, out_grad):
        padded_inputs, out_grad = (
            operand if batched else jnp.broadcast_to(operand, (axis_size, *operand.shape))
            for operand, batched in zip((padded_inputs, out_grad), in_batched)
        )
        return lax.map(lambda pair: call(*pair), (padded_inputs, out_grad)), True

    _calls[geometry] = call
    return call


def _build_and_register() -> bool:
    if os.environ.get("NEUROSEG_JAX_CPU_FFI", "1") == "0":
        return False
    try:
        library_path = _build()
        library = ctypes.cdll.LoadLibrary(str(library_path))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.NeurosegConvKernelGrad), platform="cpu")
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        warnings.warn(
            f"neuroseg_jax: the compiled CPU convolution kernel gradient (conv_ffi) is unavailable ({error}); "
            f"using XLA's formulation (same results, slower). Set NEUROSEG_JAX_CPU_FFI=0 to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    _state["library"] = library
    return True


def find_compiler() -> str | None:
    """Path of the C++ compiler the handler is built with ($CXX, c++, g++ or clang++), or None."""
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
    """Path of the compiled handler library, compiling it unless the cache has it."""
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
