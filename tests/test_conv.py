"""conv2d: values and gradients equal those of plain `lax.conv_general_dilated`.

Both CPU formulations, the compiled FFI handlers (`conv_ffi`: the kernel gradient of every
convolution, Winograd's forward, input and kernel gradient of 3x3 stride-1 ones) and the XLA forms
they replace where no compiler is found, must agree with the plain convolution and JAX's own derivative
of it for every stride, dilation, padding, group count and odd size, under jit, vmap and a sharded
multi-device mesh.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from neuroseg_jax.ops import conv, conv_ffi
from neuroseg_jax.ops import conv2d

REPO = Path(__file__).resolve().parents[1]
HAS_COMPILER = conv_ffi.find_compiler() is not None


def use_xla_formulations(monkeypatch):
    """The CPU kernel gradient without the compiled handler; tiny test maps would keep XLA's own
    kernel gradient, so the matmul form is forced."""
    monkeypatch.setattr(conv, "_ffi_available", lambda: False)
    monkeypatch.setattr(conv, "MATMUL_KERNEL_GRAD_MIN_BYTES", 0)


def use_formulation(name: str, monkeypatch) -> None:
    """"ffi": the compiled handlers, which must build wherever a compiler exists, Winograd's for every
    3x3 stride-1 convolution however small; else the XLA forms."""
    if name == "ffi":
        if not HAS_COMPILER:
            pytest.skip("no C++ compiler on this machine: conv2d uses the XLA formulations")
        assert conv_ffi.available()
        monkeypatch.setattr(conv, "WINOGRAD_MIN_TILES", 0)
    else:
        use_xla_formulations(monkeypatch)


@pytest.fixture(params=["ffi", "matmul"])
def cpu_kernel_grad(request, monkeypatch):
    """Runs a test once with each CPU kernel-gradient formulation."""
    use_formulation(request.param, monkeypatch)
    return request.param


def plain_conv(x, kernel, strides, padding, dilation, groups):
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=strides,
        padding=padding,
        rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )


def random_pair(input_shape, kernel_shape, seed=0):
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.normal(size=input_shape), jnp.float32),
        jnp.asarray(rng.normal(size=kernel_shape), jnp.float32),
    )


def loss_of(conv_fn):
    """A nonlinear scalar of the convolution, so the cotangent is not all ones."""
    return lambda x, kernel: jnp.sum(jnp.sin(conv_fn(x, kernel)))


# (input NHWC, kernel HWIO, strides, padding, dilation, groups)
CASES = [
    ((2, 9, 11, 3), (3, 3, 3, 5), (1, 1), "SAME", (1, 1), 1),  # odd sizes, split shifts
    ((1, 8, 7, 4), (3, 3, 4, 2), (2, 1), "VALID", (1, 1), 1),  # batch 1, row stride
    ((2, 10, 9, 4), (3, 2, 4, 6), (1, 2), ((1, 2), (0, 1)), (2, 1), 1),  # explicit pads, col stride
    ((2, 9, 9, 8), (3, 3, 8, 8), (2, 2), "SAME", (2, 2), 1),  # stride and dilation
    ((1, 7, 6, 1), (5, 3, 1, 4), (1, 1), ((2, -1), (1, 1)), (1, 1), 1),  # thin input, negative pad
    ((2, 6, 5, 8), (1, 1, 8, 3), (1, 1), "SAME", (1, 1), 1),  # 1x1
    ((1, 7, 9, 4), (1, 1, 4, 5), (2, 3), "VALID", (1, 1), 1),  # strided 1x1 (odd sizes)
    ((1, 5, 6, 3), (1, 1, 3, 2), (1, 1), ((1, 0), (0, 2)), (1, 1), 1),  # padded 1x1
    ((1, 9, 8, 6), (3, 3, 6, 6), (1, 1), "SAME_LOWER", (1, 3), 1),
    ((2, 10, 9, 4), (3, 3, 2, 6), (1, 1), "SAME", (1, 2), 2),  # grouped
    ((1, 8, 8, 4), (3, 3, 1, 4), (2, 2), "VALID", (1, 1), 4),  # depthwise
    # Direct kernel-gradient handler's register blocks (strided, so not Winograd's): 39 product rows
    # (3 blocks of 12 + 3), 37 and 21 output channels (full vector pairs, a single vector and a
    # zero-padded tail), rows longer than a tile.
    ((2, 11, 13, 13), (3, 3, 13, 37), (2, 1), "SAME", (1, 1), 1),
    ((1, 9, 40, 5), (3, 3, 5, 21), (2, 1), ((1, 1), (2, 0)), (1, 2), 1),
    ((1, 3, 1200, 2), (3, 3, 2, 3), (1, 2), "SAME", (1, 1), 1),
    # The same shapes through the Winograd handlers, and dilated ones (phases of unequal length).
    ((2, 11, 13, 13), (3, 3, 13, 37), (1, 1), "SAME", (1, 1), 1),
    ((1, 3, 600, 2), (3, 3, 2, 3), (1, 1), "SAME", (1, 1), 1),
    ((2, 11, 13, 13), (3, 3, 13, 37), (1, 1), "SAME", (2, 3), 1),
    ((1, 10, 11, 5), (3, 3, 5, 7), (1, 1), ((3, 1), (0, 4)), (3, 2), 1),
    # Winograd forward and input gradient (3x3, stride 1): pads wider than the kernel and negative
    # (outputs past the image, tiles cut at odd edges), channel tails, a single pixel, and a row
    # of 550 tiles, more than one block.
    ((1, 5, 7, 20), (3, 3, 20, 3), (1, 1), ((2, 0), (0, 3)), (1, 1), 1),
    ((2, 8, 6, 17), (3, 3, 17, 33), (1, 1), ((-1, 1), (1, -1)), (1, 1), 1),
    ((1, 1, 1, 4), (3, 3, 4, 6), (1, 1), "SAME", (1, 1), 1),
    ((1, 4, 1100, 16), (3, 3, 16, 32), (1, 1), "SAME", (1, 1), 1),
    # Few channels (shifted-plane sums): IMSAHLO's spatial attention, and 8 channel pairs with
    # dilation and wide, negative and uneven pads.
    ((2, 12, 10, 2), (7, 7, 2, 1), (1, 1), "SAME", (1, 1), 1),
    ((1, 9, 8, 1), (3, 3, 1, 8), (1, 1), ((3, 0), (-1, 2)), (2, 1), 1),
]


def assert_close(got, want, tolerance=2e-5, name=""):
    """Relative to the largest |want|: gradients sum many products, so entries near 0 carry that error."""
    np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance * float(jnp.max(jnp.abs(want))), err_msg=name)


def assert_matches_plain(case, *, transform=lambda f: f, tolerance=2e-5):
    input_shape, kernel_shape, strides, padding, dilation, groups = case
    x, kernel = random_pair(input_shape, kernel_shape)
    ours = loss_of(lambda a, b: conv2d(a, b, strides=strides, padding=padding, dilation=dilation, groups=groups))
    plain = loss_of(lambda a, b: plain_conv(a, b, strides, padding, dilation, groups))
    expected = jax.jit(jax.grad(plain, (0, 1)))(x, kernel)
    actual = transform(jax.grad(ours, (0, 1)))(x, kernel)
    for got, want, name in zip(actual, expected, ("inputs", "kernel")):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        assert_close(got, want, tolerance, name)


def case_id(case) -> str:
    input_shape, kernel_shape, strides, padding, dilation, groups = case
    return f"{input_shape}-{kernel_shape}-s{strides}-{padding}-d{dilation}-g{groups}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_and_gradients_match_plain_convolution(case, cpu_kernel_grad):
    input_shape, kernel_shape, strides, padding, dilation, groups = case
    x, kernel = random_pair(input_shape, kernel_shape)
    np.testing.assert_allclose(
        conv2d(x, kernel, strides=strides, padding=padding, dilation=dilation, groups=groups),
        plain_conv(x, kernel, strides, padding, dilation, groups),
        rtol=1e-5,
        atol=1e-5,
    )
    assert_matches_plain(case, transform=jax.jit)


@pytest.mark.parametrize("case", CASES[:5], ids=case_id)
def test_chunked_kernel_gradient_matches(case, monkeypatch):
    """Tiny chunks force the fori_loop over output rows, including zero-padded last chunks."""
    use_xla_formulations(monkeypatch)
    monkeypatch.setattr(conv, "CHUNK_POSITIONS", 7)
    assert_matches_plain(case, transform=jax.jit)


@pytest.mark.parametrize("channels", [(4, 5), (2, 1)], ids=["winograd", "thin"])
def test_vmap_over_inputs_and_kernels(channels, cpu_kernel_grad):
    x, kernel = random_pair((3, 2, 7, 9, channels[0]), (3, 3, 3, *channels))
    ours = jax.vmap(jax.grad(loss_of(lambda a, b: conv2d(a, b, padding="SAME")), (0, 1)))
    plain = jax.vmap(jax.grad(loss_of(lambda a, b: plain_conv(a, b, (1, 1), "SAME", (1, 1), 1)), (0, 1)))
    for got, want in zip(jax.jit(ours)(x, kernel), jax.jit(plain)(x, kernel)):
        assert_close(got, want)


def test_vmap_shared_kernel_with_chunks(cpu_kernel_grad, monkeypatch):
    monkeypatch.setattr(conv, "CHUNK_POSITIONS", 5)
    x, kernel = random_pair((2, 1, 6, 7, 3), (3, 3, 3, 4))
    ours = jax.vmap(jax.grad(loss_of(lambda a, b: conv2d(a, b)), (0, 1)), in_axes=(0, None))
    plain = jax.vmap(
        jax.grad(loss_of(lambda a, b: plain_conv(a, b, (1, 1), "SAME", (1, 1), 1)), (0, 1)), in_axes=(0, None)
    )
    for got, want in zip(jax.jit(ours)(x, kernel), jax.jit(plain)(x, kernel)):
        assert_close(got, want)


@pytest.mark.parametrize(
    "formulation, kernel_size, threshold", [("ffi", 3, 0), ("matmul", 3, 0), ("xla", 3, 1 << 40), ("matmul", 1, 0)]
)
def test_bfloat16_gradients_keep_dtypes(formulation, kernel_size, threshold, monkeypatch):
    use_formulation(formulation, monkeypatch)
    monkeypatch.setattr(conv, "MATMUL_KERNEL_GRAD_MIN_BYTES", threshold)
    x, kernel = random_pair((2, 16, 16, 32), (kernel_size, kernel_size, 32, 32))  # large enough for a dot thunk
    x, kernel = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    grads = jax.jit(jax.grad(lambda a, b: jnp.sum(conv2d(a, b).astype(jnp.float32)), (0, 1)))(x, kernel)
    expected = jax.jit(
        jax.grad(lambda a, b: jnp.sum(plain_conv(a, b, (1, 1), "SAME", (1, 1), 1).astype(jnp.float32)), (0, 1))
    )(x, kernel)
    for got, want in zip(grads, expected):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.float32(got), np.float32(want), rtol=2e-2, atol=0.1)


def test_small_maps_keep_xla_kernel_gradient(monkeypatch):
    use_xla_formulations(monkeypatch)
    monkeypatch.setattr(conv, "MATMUL_KERNEL_GRAD_MIN_BYTES", 4 << 20)
    assert_matches_plain(CASES[0], transform=jax.jit)
    monkeypatch.setattr(conv, "_kernel_grad_matmul", None)  # would fail if called
    assert_matches_plain(CASES[3], transform=jax.jit)


def test_native_kernel_gradient_branch_matches():
    """XLA's own kernel gradient (the CPU's choice on small maps without the handler) against the
    matrix-product form."""
    x, kernel = random_pair((2, 7, 6, 3), (3, 3, 3, 4))
    grad = jnp.cos(plain_conv(x, kernel, (2, 1), ((1, 1), (0, 2)), (1, 2), 1))
    common = dict(strides=(2, 1), pads=((1, 1), (0, 2)), dilation=(1, 2))
    native = jax.jit(partial(conv._kernel_grad_native, kernel=kernel, **common))(x, grad)
    matmul = jax.jit(partial(conv._kernel_grad_matmul, kernel_shape=kernel.shape, **common))(x, grad)
    assert_close(matmul, native)


@pytest.mark.parametrize(
    "input_shape, kernel_shape, padding, dilation",
    [
        ((2, 9, 11, 3), (3, 3, 3, 5), "SAME", (2, 2)),  # Ho, Wo not multiples of the dilation
        ((1, 16, 24, 4), (3, 3, 4, 2), "SAME", (4, 4)),
        ((2, 13, 10, 2), (3, 2, 2, 3), "VALID", (3, 2)),  # input rows no output reaches
        ((1, 12, 11, 2), (5, 3, 2, 2), ((1, 4), (0, 3)), (2, 3)),
        ((1, 8, 8, 2), (3, 3, 2, 2), ((-1, 2), (2, -1)), (2, 2)),  # negative pads crop
    ],
)
def test_gpu_dilated_kernel_gradient_matches(input_shape, kernel_shape, padding, dilation):
    """The NVIDIA/AMD branch for dilated convolutions (phase images on the batch axis), run on CPU,
    against the kernel gradient of the plain convolution."""
    x, kernel = random_pair(input_shape, kernel_shape)
    pads = conv._explicit_pads(x.shape, kernel.shape, (1, 1), dilation, padding)
    grad = jnp.cos(plain_conv(x, kernel, (1, 1), pads, dilation, 1))
    (want,) = jax.vjp(lambda k: plain_conv(x, k, (1, 1), pads, dilation, 1), kernel)[1](grad)
    phases = partial(conv._kernel_grad_dilation_phases, kernel=kernel, pads=pads, dilation=dilation)
    assert_close(jax.jit(phases)(x, grad), want)
    bf16 = partial(conv._kernel_grad_dilation_phases, kernel=kernel.astype(jnp.bfloat16), pads=pads, dilation=dilation)
    assert jax.jit(bf16)(x.astype(jnp.bfloat16), grad.astype(jnp.bfloat16)).dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(strides=(0, 1)), "strides"),
        (dict(dilation=(1,)), "dilation"),
        (dict(groups=3), "groups"),
        (dict(padding=((1, 1),)), "padding"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    x, kernel = random_pair((1, 5, 5, 4), (3, 3, 4, 2))
    with pytest.raises(ValueError, match=message):
        conv2d(x, kernel, **kwargs)


def test_bad_ranks_raise():
    with pytest.raises(ValueError, match="NHWC"):
        conv2d(jnp.zeros((5, 5, 4)), jnp.zeros((3, 3, 4, 2)))


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler on this machine")
@pytest.mark.parametrize("batch, height, width, winograd", [(2, 16, 16, True), (1, 15, 29, False), (1, 15, 31, True)])
def test_winograd_only_from_min_tiles(batch, height, width, winograd):
    """3x3 stride-1 convolutions with at least WINOGRAD_MIN_TILES 2x2 output tiles (128: 2x16x16,
    1x15x31) run forward, input and kernel gradient through the Winograd handlers, smaller ones
    through XLA and the direct kernel-gradient handler."""
    assert conv_ffi.available()
    x, kernel = random_pair((batch, height, width, 4), (3, 3, 4, 8))
    step = jax.jit(jax.grad(loss_of(lambda a, b: conv2d(a, b)), (0, 1)))
    hlo = step.lower(x, kernel).compile().as_text()
    assert hlo.count('custom_call_target="neuroseg_conv_winograd"') == (2 if winograd else 0)
    assert hlo.count('custom_call_target="neuroseg_conv_winograd_kernel_grad"') == (1 if winograd else 0)
    assert hlo.count('custom_call_target="neuroseg_conv_kernel_grad"') == (0 if winograd else 1)


@pytest.mark.parametrize("kernel_shape, thin", [((7, 7, 2, 1), True), ((3, 3, 1, 8), True), ((3, 3, 2, 5), False)])
def test_thin_convolutions_run_without_xla_convolution(kernel_shape, thin, monkeypatch):
    """Up to THIN_MAX_CHANNEL_PAIRS (8) channel pairs, forward and input gradient are shifted-plane
    sums on the CPU: no convolution in the compiled step (the kernel gradient is the direct
    handler where it is built, XLA's own convolution otherwise)."""
    monkeypatch.setattr(conv, "WINOGRAD_MIN_TILES", 1 << 30)
    x, kernel = random_pair((2, 16, 16, kernel_shape[2]), kernel_shape)
    forward_and_input_grad = jax.jit(jax.grad(loss_of(lambda a, b: conv2d(a, b)), 0))
    hlo = forward_and_input_grad.lower(x, kernel).compile().as_text()
    assert (" convolution(" not in hlo) == thin


SHARDED_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax import lax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from neuroseg_jax.ops import conv
    from neuroseg_jax.ops import conv2d

    available, default_chunk = conv._ffi_available, conv.CHUNK_POSITIONS

    assert jax.device_count() == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(4), ("data",))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(8, 9, 7, 3)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 5)), jnp.float32)
    x = jax.device_put(x, NamedSharding(mesh, P("data")))
    kernel = jax.device_put(kernel, NamedSharding(mesh, P()))

    def loss(conv_fn, a, b):
        return jnp.sum(jnp.sin(conv_fn(a, b)))

    # A strided, dilated convolution (kernel-gradient handler), a 3x3 stride-1 one (Winograd's) and a
    # thin one (shifted planes forward, Winograd's kernel gradient).
    cases = (
        ((1, 2), (2, 1), 5, ["neuroseg_conv_kernel_grad"]),
        ((1, 1), (1, 1), 5, ["neuroseg_conv_winograd", "neuroseg_conv_winograd_kernel_grad"]),
        ((1, 1), (2, 1), 2, ["neuroseg_conv_winograd_kernel_grad"]),
    )
    for strides, dilation, channels_out, targets in cases:
        kernel_out = kernel[..., :channels_out]
        plain = lambda a, b: lax.conv_general_dilated(a, b, strides, "SAME", rhs_dilation=dilation,
                                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
        ours = lambda a, b: conv2d(a, b, strides=strides, padding="SAME", dilation=dilation)
        expected = jax.jit(jax.grad(lambda a, b: loss(plain, a, b), (0, 1)))(x, kernel_out)
        conv.MATMUL_KERNEL_GRAD_MIN_BYTES = conv.WINOGRAD_MIN_TILES = 0
        use_ffi = available()
        assert use_ffi == HAS_COMPILER
        for ffi, chunk in ((use_ffi, default_chunk), (False, default_chunk), (False, 6)):
            conv._ffi_available = lambda: ffi
            conv.CHUNK_POSITIONS = chunk
            step = jax.jit(jax.grad(lambda a, b: loss(ours, a, b), (0, 1)))
            got = step(x, kernel_out)
            assert got[0].sharding.is_equivalent_to(x.sharding, 4), got[0].sharding
            for g, e in zip(got, expected):
                np.testing.assert_allclose(g, e, rtol=2e-5, atol=2e-5 * float(jnp.max(jnp.abs(e))))
            if ffi:  # one call per device on its 2 images (the kernel gradient then summed over devices)
                hlo = step.lower(x, kernel_out).compile().as_text()
                for target in targets:
                    calls = [line for line in hlo.splitlines() if f'custom_call_target="{target}"' in line]
                    assert calls and all("operand_layout_constraints={f32[2," in line for line in calls), calls
                assert "all-reduce" in hlo
    print("sharded ok")
    """
)


def test_sharded_gradients_on_four_cpu_devices():
    """Both CPU formulations on a batch sharded over four devices; the handler runs per shard."""
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-c", f"HAS_COMPILER = {HAS_COMPILER}\n" + SHARDED_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "sharded ok" in result.stdout, result.stderr[-3000:]


BUILD_SCRIPT = textwrap.dedent(
    """
    import json, warnings
    import jax, jax.numpy as jnp, numpy as np
    from jax import lax
    from neuroseg_jax.ops import conv, conv_ffi

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = conv_ffi.available()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 9, 10, 3)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
    plain = lambda k: lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    want = jax.grad(lambda k: jnp.sum(jnp.sin(plain(k))))(kernel)
    got = jax.jit(jax.grad(lambda k: jnp.sum(jnp.sin(conv.conv2d(x, k)))))(kernel)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * float(jnp.max(jnp.abs(want))))
    print(json.dumps({"available": available, "warnings": [str(w.message) for w in caught]}))
    """
)


def run_build_script(tmp_path, **env_changes):
    """Runs BUILD_SCRIPT in a fresh process with the handler cache in tmp_path/cache; its report."""
    env = dict(os.environ, NEUROSEG_JAX_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    for name, value in env_changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    result = subprocess.run([sys.executable, "-c", BUILD_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler on this machine")
def test_handler_is_built_once_into_the_cache(tmp_path):
    first = run_build_script(tmp_path)
    assert first == {"available": True, "warnings": []}
    (library,) = (tmp_path / "cache").glob("conv_ffi-*.so")
    built = library.stat().st_mtime_ns
    assert run_build_script(tmp_path) == first
    assert [path.name for path in (tmp_path / "cache").iterdir()] == [library.name]
    assert library.stat().st_mtime_ns == built


@pytest.mark.parametrize(
    "env_changes, message",
    [
        (dict(NEUROSEG_JAX_CPU_FFI="0"), None),
        (dict(CXX=None, PATH=""), "no C[+][+] compiler found"),
        (dict(CXX="false"), "failed"),
    ],
    ids=["turned-off", "no-compiler", "compiler-fails"],
)
def test_without_the_handler_gradients_stay_right(tmp_path, env_changes, message):
    """Turned off: silent; no compiler or a failing build: a warning saying why, the XLA formulation
    instead (the script checks the gradient either way), and nothing left in the cache."""
    if env_changes.get("CXX") == "false" and not shutil.which("false"):
        pytest.skip("no `false` command")
    report = run_build_script(tmp_path, **env_changes)
    assert report["available"] is False
    if message is None:
        assert report["warnings"] == []
    else:
        assert len(report["warnings"]) == 1 and re.search(message, report["warnings"][0]), report
        assert "XLA's formulation" in report["warnings"][0]
    assert not list((tmp_path / "cache").glob("*.so"))
