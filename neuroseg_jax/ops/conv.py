"""The 2-D convolution every model uses (`models.layers.Conv`), with fast CPU kernels for both passes.

`conv2d` computes what `lax.conv_general_dilated` computes (NHWC inputs, HWIO kernel), by the
fastest formulation the platform offers; `implementation="lax"` asks for the plain convolution.
What each formulation below gained, and what was tried instead, is in benchmarks/README.md under
the topic named in brackets.

On the CPU, `conv2d` is a `jax.custom_vjp` because XLA's CPU backend computes the *kernel* gradient
of a convolution as a convolution whose "kernel" is the whole output cotangent (spatial size
Ho x Wo) and whose output is the tiny kh x kw window, a shape that defeats its convolution kernels
once the image is large ["Kernel gradient on the CPU"]. The CPU kernel gradient is, in order of
preference:

0. for the 3x3 stride-1 layers that run forward through Winograd's algorithm (below),
   the compiled Winograd kernel gradient (`conv_ffi.winograd_kernel_grad`);
1. the compiled XLA FFI handler of `conv_ffi` (built on first use with the machine's C++
   compiler), at least as fast as either XLA form below at every size measured, by the widest
   margin on large maps;
2. where no compiler is found: an unpadded, unstrided 1x1 convolution's kernel gradient as one
   matrix product; otherwise, above `MATMUL_KERNEL_GRAD_MIN_BYTES` of cotangent per image, the
   chunked matrix-product form `_kernel_grad_matmul`; below it XLA's own kernel gradient, which is
   faster while one image's cotangent fits in cache.

The matrix-product form: the kernel gradient is a sum over every output position p = (n, y, x) of
outer products
    dK[i, j, c, o] = sum_p  x_pad[n, y*sh + i*dh, x*sw + j*dw, c] * g[n, y, x, o]
i.e. a matrix product contracting the M = N*Ho*Wo axis once the kh*kw shifted views of the
input are available. Materialising all kh*kw views (im2col) copies kh*kw times the input;
instead the shifts are *split between the two operands*: the input carries the kh row shifts
(concatenated on channels, M' x kh*Cin) and the cotangent, zero padded along the width, carries
the kw column shifts (M' x kw*Cout), M' = N*Ho*(Wo + (kw-1)*dw). Their product
(kh*Cin, kw*Cout) holds exactly the kh*kw blocks dK[i, j], because
x_pad[.., y + i, x + j] * g[.., y, x] re-indexes as x_pad[.., y + i, x'] * g_j[.., y, x'] with
x' = x + j and g_j the cotangent shifted right by j. Copy volume is kh*Cin + kw*Cout per position
instead of kh*kw*Cin. For thin inputs (first layer: Cin = 1 or 3) full im2col on the input is
cheaper and is used; it is also the formulation for convolutions strided along the width, where
the cotangent shift would need zero-interleaving.
The output rows are processed in chunks of ~`CHUNK_POSITIONS` positions (a `fori_loop`
accumulating the small product) so the shifted copies of a chunk stay in cache: un-chunked, the
copies of a large map cost fresh memory per layer and made the product slower. Its limit is
Eigen's two-thread scaling of these small products, which the handler avoids by giving each
thread its own rows.

Unpadded, unstrided 1x1 convolutions run forward and input gradient as matrix products over the
channels on every platform ["1x1 convolutions as matrix products"].

3x3 stride-1 convolutions, dilated or not (most of every network here), with at least
`WINOGRAD_MIN_TILES` 2x2 output tiles run forward and input gradient, on the CPU where the handlers
are built, by `conv_ffi.winograd_conv` (Winograd F(2x2, 3x3)), the input gradient as the
correlation of the cotangent with the flipped, channel-transposed kernel (and the same dilation)
["Winograd F(2x2,3x3) handlers"].

Stride-1 convolutions with at most `THIN_MAX_CHANNEL_PAIRS` (input, output) channel pairs, such as
IMSAHLO's 7x7 2->1 spatial attention, run forward and input gradient on the CPU as sums of shifted
image planes (`_shifted_planes_conv`), the input gradient again as the correlation with the flipped
kernel; their kernel gradient is the handler's (or XLA's) ["Thin convolutions as shifted-plane
sums"]. Other input gradients stay XLA's transposed convolution, as fast as its forward pass.

Off the CPU (`lax.platform_dependent`) the convolution is plain lax ops with JAX's own derivatives,
except for stride-1 dilated convolutions on NVIDIA/AMD GPUs: XLA's GPU compiler does not recognise
their kernel gradient as cuDNN's backward-filter convolution and runs it as a forward convolution
whose window is the whole image ["Dilated kernel gradients on GPUs"]. There a custom VJP moves the
dilation into the batch instead (`_kernel_grad_dilation_phases`), which leaves an undilated kernel
gradient that cuDNN's backward filter takes.
Grouped convolutions (groups > 1) use JAX's native autodiff on every platform.

Forward-mode autodiff (`jax.jvp`, `jax.linearize`, `jax.jacfwd`) needs JAX's own derivatives: it
works with `implementation="lax"`, for grouped convolutions, and off the CPU except for the dilated
convolutions on NVIDIA/AMD GPUs. Through the custom VJPs JAX raises "can't apply forward-mode
autodiff (jvp) to a custom_vjp function": a custom VJP gives the backward pass only, and JAX offers
no public way to tell a forward-mode trace from a reverse-mode one, so the switch is the caller's
(`config.model.conv='lax'` for the models).
"""

from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from neuroseg_jax._validation import pair
from neuroseg_jax.ops import conv_ffi

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
Pads = tuple[tuple[int, int], tuple[int, int]]
Pair = tuple[int, int]

# 'auto': the fastest formulation per platform (module doc); 'lax': `lax.conv_general_dilated` with
# JAX's own derivatives, forward mode included.
CONV_IMPLEMENTATIONS = ("auto", "lax")

# XLA's kernel gradient is fast while one image's cotangent (Ho*Wo*Cout) fits in cache: below
# 4 MiB it beat the matmul form, above it the matmul form won ["Kernel gradient on the CPU"].
MATMUL_KERNEL_GRAD_MIN_BYTES = 4 << 20

# The Winograd handler's fewest 2x2 output tiles (over the batch): below it, on small maps with wide
# channels, transforming the kernel costs more than it saves.
WINOGRAD_MIN_TILES = 128

# Stride-1 convolutions with at most this many (input, output) channel pairs run forward and input
# gradient on the CPU as sums of shifted image planes (`_shifted_planes_conv`); XLA's CPU convolution
# takes about as long for these whatever their size, and above 8 pairs the sums lost.
THIN_MAX_CHANNEL_PAIRS = 8

# Output positions per kernel-gradient chunk (module doc); 1024-2048 measured best at 32-256
# channels, larger chunks slower, 512 no better.
CHUNK_POSITIONS = 2048


def conv2d(
    inputs: jax.Array,
    kernel: jax.Array,
    *,
    strides: Sequence[int] = (1, 1),
    padding: str | Sequence[tuple[int, int]] = "SAME",
    dilation: Sequence[int] = (1, 1),
    groups: int = 1,
    implementation: str = "auto",
) -> jax.Array:
    """2-D cross-correlation, same semantics as `lax.conv_general_dilated`.

    Args:
      inputs: (N, H, W, Cin) array.
      kernel: (kh, kw, Cin // groups, Cout) array (HWIO), Cout divisible by `groups`.
      strides: (sh, sw) window strides.
      padding: 'SAME', 'SAME_LOWER', 'VALID' or ((top, bottom), (left, right)).
      dilation: (dh, dw) kernel (rhs) dilation.
      groups: feature_group_count.
      implementation: one of `CONV_IMPLEMENTATIONS`: 'auto' (the fast formulations of the module
        doc) or 'lax' (plain `lax.conv_general_dilated`).

    Returns:
      (N, Ho, Wo, Cout) array; Ho, Wo as in `lax.conv_general_dilated`.
      Reverse-mode gradients (grad/vjp, under jit, vmap, sharding, remat) equal those of
      `lax.conv_general_dilated` up to float rounding. Forward mode (jvp, linearize, jacfwd): see
      the module doc; it always works with implementation='lax'.

    Raises:
      ValueError: on non-4-D arrays, channel/group mismatches, bad strides, dilation, padding or
        implementation.
    """
    if implementation not in CONV_IMPLEMENTATIONS:
        raise ValueError(f"conv2d: implementation must be one of {CONV_IMPLEMENTATIONS}, got {implementation!r}")
    strides_pair = pair(strides, "conv2d strides", minimum=1)
    dilation_pair = pair(dilation, "conv2d dilation", minimum=1)
    _check_shapes(inputs, kernel, groups)
    pads = _explicit_pads(inputs.shape, kernel.shape, strides_pair, dilation_pair, padding)
    if implementation == "lax" or groups != 1:
        return _lax_conv(inputs, kernel, strides_pair, pads, dilation_pair, groups)

    def portable(x: jax.Array, k: jax.Array) -> jax.Array:
        return _conv_or_product(x, k, strides_pair, pads, dilation_pair)

    def cpu(x: jax.Array, k: jax.Array) -> jax.Array:
        return _conv_cpu(x, k, strides_pair, pads, dilation_pair)

    gpu = portable
    if dilation_pair != (1, 1) and strides_pair == (1, 1):
        def gpu(x: jax.Array, k: jax.Array) -> jax.Array:
            return _conv_dilated_gpu(x, k, pads, dilation_pair)

    return lax.platform_dependent(inputs, kernel, cpu=cpu, cuda=gpu, rocm=gpu, default=portable)


def _check_shapes(inputs: jax.Array, kernel: jax.Array, groups: int) -> None:
    if inputs.ndim != 4 or kernel.ndim != 4:
        raise ValueError(
            f"conv2d: expected NHWC inputs and HWIO kernel (4-D each), got shapes "
            f"{inputs.shape} and {kernel.shape}"
        )
    if groups < 1 or inputs.shape[3] != kernel.shape[2] * groups or kernel.shape[3] % groups:
        raise ValueError(
            f"conv2d: inputs channels {inputs.shape[3]} must equal kernel in-channels "
            f"{kernel.shape[2]} x groups {groups}, and kernel out-channels {kernel.shape[3]} "
            f"must be divisible by groups"
        )


def _explicit_pads(
    input_shape: tuple[int, ...],
    kernel_shape: tuple[int, ...],
    strides: Pair,
    dilation: Pair,
    padding: str | Sequence[tuple[int, int]],
) -> Pads:
    """Padding as ((top, bottom), (left, right)) ints, resolving 'SAME'/'VALID' like lax does."""
    if isinstance(padding, str):
        dilated_window = tuple((k - 1) * d + 1 for k, d in zip(kernel_shape[:2], dilation))
        pairs = lax.padtype_to_pads(input_shape[1:3], dilated_window, strides, padding)
    else:
        pairs = [tuple(int(p) for p in pair) for pair in padding]
        if len(pairs) != 2 or any(len(pair) != 2 for pair in pairs):
            raise ValueError(f"conv2d: padding must be a string or two (low, high) pairs, got {padding!r}")
    return tuple((int(lo), int(hi)) for lo, hi in pairs)


def _lax_conv(
    inputs: jax.Array, kernel: jax.Array, strides: Pair, pads: Pads, dilation: Pair, groups: int = 1
) -> jax.Array:
    return lax.conv_general_dilated(
        inputs,
        kernel,
        window_strides=strides,
        padding=pads,
        rhs_dilation=dilation,
        dimension_numbers=_DIMENSION_NUMBERS,
        feature_group_count=groups,
    )


def _is_pointwise(kernel_shape: tuple[int, ...], strides: Pair, pads: Pads) -> bool:
    return kernel_shape[:2] == (1, 1) and strides == (1, 1) and pads == ((0, 0), (0, 0))


def _conv_or_product(inputs: jax.Array, kernel: jax.Array, strides: Pair, pads: Pads, dilation: Pair) -> jax.Array:
    """The convolution; an unpadded 1x1 one as the matrix product over channels it is (XLA's CPU
    convolution ran 1x1 convolutions slower than this product, forward and input gradient alike)."""
    if _is_pointwise(kernel.shape, strides, pads):
        return lax.dot_general(inputs, kernel[0, 0], (((3,), (0,)), ((), ())))
    return _lax_conv(inputs, kernel, strides, pads, dilation)


def _is_winograd(kernel_shape: tuple[int, ...], strides: Pair, batch: int, output_size: Pair) -> bool:
    """Whether the compiled Winograd handlers compute this convolution and its gradients."""
    tiles = batch * (-(-output_size[0] // 2)) * (-(-output_size[1] // 2))
    return kernel_shape[:2] == (3, 3) and strides == (1, 1) and tiles >= WINOGRAD_MIN_TILES and _ffi_available()


def _is_thin(kernel_shape: tuple[int, ...], strides: Pair) -> bool:
    """Whether the CPU computes this convolution and its input gradient as shifted-plane sums."""
    return strides == (1, 1) and kernel_shape[2] * kernel_shape[3] <= THIN_MAX_CHANNEL_PAIRS


def _shifted_planes_conv(inputs: jax.Array, kernel: jax.Array, pads: Pads, dilation: Pair) -> jax.Array:
    """A stride-1 convolution as, per output channel, the sum over taps (i, j) and input channels c
    of the padded input plane c shifted by (i*dh, j*dw) times k[i, j, c, o], in float32. XLA fuses
    each sum into one loop along the image width, so few channels cost a few passes over the image."""
    kh, kw, cin, cout = kernel.shape
    (dh, dw), zero = dilation, jnp.zeros((), jnp.float32)
    planes = lax.pad(
        jnp.moveaxis(inputs, 3, 0).astype(jnp.float32), zero, ((0, 0, 0), (0, 0, 0), (*pads[0], 0), (*pads[1], 0))
    )
    height, width = planes.shape[2] - (kh - 1) * dh, planes.shape[3] - (kw - 1) * dw
    weights = kernel.astype(jnp.float32)
    outputs = []
    for o in range(cout):
        total = None
        for i in range(kh):
            for j in range(kw):
                for c in range(cin):
                    term = planes[c, :, i * dh : i * dh + height, j * dw : j * dw + width] * weights[i, j, c, o]
                    total = term if total is None else total + term
        outputs.append(total)
    # Materialised: fused into a consumer that broadcasts it over channels (IMSAHLO's attention
    # spreads its 2-channel input gradient over 32), each sum was recomputed once per channel.
    return lax.optimization_barrier(jnp.stack(outputs, axis=-1))


def _cpu_forward(inputs: jax.Array, kernel: jax.Array, strides: Pair, pads: Pads, dilation: Pair) -> jax.Array:
    if _is_thin(kernel.shape, strides):
        return _shifted_planes_conv(inputs, kernel, pads, dilation).astype(inputs.dtype)
    (top, bottom), (left, right) = pads
    output_size = (inputs.shape[1] + top + bottom - 2 * dilation[0], inputs.shape[2] + left + right - 2 * dilation[1])
    if _is_winograd(kernel.shape, strides, inputs.shape[0], output_size):
        return conv_ffi.winograd_conv(inputs, kernel, (top, left), output_size, dilation).astype(inputs.dtype)
    return _conv_or_product(inputs, kernel, strides, pads, dilation)


def _xla_input_grad(inputs: jax.Array, kernel: jax.Array, strides: Pair, pads: Pads, dilation: Pair, out_grad):
    (inputs_grad,) = jax.linear_transpose(lambda x: _conv_or_product(x, kernel, strides, pads, dilation), inputs)(
        out_grad
    )
    return inputs_grad


def _cpu_input_grad(inputs: jax.Array, kernel: jax.Array, strides: Pair, pads: Pads, dilation: Pair, out_grad):
    thin = _is_thin(kernel.shape, strides)
    if not (thin or _is_winograd(kernel.shape, strides, out_grad.shape[0], out_grad.shape[1:3])):
        return _xla_input_grad(inputs, kernel, strides, pads, dilation, out_grad)
    # The transposed convolution of a stride-1 one is a stride-1 correlation of the cotangent with the
    # kernel flipped in space and transposed in channels, with the same dilation d, padded by
    # d*(k - 1) - pad on each side.
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    transposed_pads = tuple(
        (d * (k - 1) - low, d * (k - 1) - high) for d, k, (low, high) in zip(dilation, kernel.shape[:2], pads)
    )
    if thin:
        return _shifted_planes_conv(out_grad, flipped, transposed_pads, dilation).astype(out_grad.dtype)
    shift = (transposed_pads[0][0], transposed_pads[1][0])
    return conv_ffi.winograd_conv(out_grad, flipped, shift, inputs.shape[1:3], dilation).astype(out_grad.dtype)


def _cpu_kernel_grad(inputs: jax.Array, kernel: jax.Array, strides: Pair, pads: Pads, dilation: Pair, out_grad):
    """The kernel gradient by the first formulation of the module doc's list that applies, in the
    kernel's dtype (the CPU products accumulate in float32)."""
    _, ho, wo, cout = out_grad.shape
    if _is_winograd(kernel.shape, strides, out_grad.shape[0], out_grad.shape[1:3]):
        kernel_grad = conv_ffi.winograd_kernel_grad(inputs, out_grad, (pads[0][0], pads[1][0]), dilation)
    elif _ffi_available():
        padded = lax.pad(inputs, jnp.zeros((), inputs.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
        kernel_grad = conv_ffi.kernel_grad(padded, out_grad, kernel.shape[:2], strides, dilation)
    elif _is_pointwise(kernel.shape, strides, pads):
        # A 1x1 convolution's kernel gradient is one matrix product; XLA's CPU convolution form of it
        # ran slower at every size measured.
        kernel_grad = _contract_positions(inputs, out_grad).reshape(kernel.shape)
    elif ho * wo * cout * out_grad.dtype.itemsize >= MATMUL_KERNEL_GRAD_MIN_BYTES:
        kernel_grad = _kernel_grad_matmul(
            inputs, out_grad, kernel_shape=kernel.shape, strides=strides, pads=pads, dilation=dilation
        )
    else:
        kernel_grad = _kernel_grad_native(inputs, out_grad, kernel=kernel, strides=strides, pads=pads, dilation=dilation)
    return kernel_grad.astype(kernel.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_cpu(inputs: jax.Array, kernel: jax.Array, strides: Pair, pads: Pads, dilation: Pair) -> jax.Array:
    """The CPU branch of `conv2d`: the module doc's forward pass and gradients."""
    return _cpu_forward(inputs, kernel, strides, pads, dilation)


def _conv_cpu_fwd(inputs, kernel, strides, pads, dilation):
    return _cpu_forward(inputs, kernel, strides, pads, dilation), (inputs, kernel)


def _conv_cpu_bwd(strides, pads, dilation, residuals, out_grad):
    inputs, kernel = residuals
    return (
        _cpu_input_grad(inputs, kernel, strides, pads, dilation, out_grad),
        _cpu_kernel_grad(inputs, kernel, strides, pads, dilation, out_grad),
    )


_conv_cpu.defvjp(_conv_cpu_fwd, _conv_cpu_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_dilated_gpu(inputs: jax.Array, kernel: jax.Array, pads: Pads, dilation: Pair) -> jax.Array:
    """The NVIDIA/AMD branch of `conv2d` for stride-1 dilated convolutions: XLA's convolution, its
    kernel gradient over dilation phases (module doc)."""
    return _conv_or_product(inputs, kernel, (1, 1), pads, dilation)


def _conv_dilated_gpu_fwd(inputs, kernel, pads, dilation):
    return _conv_or_product(inputs, kernel, (1, 1), pads, dilation), (inputs, kernel)


def _conv_dilated_gpu_bwd(pads, dilation, residuals, out_grad):
    inputs, kernel = residuals
    return (
        _xla_input_grad(inputs, kernel, (1, 1), pads, dilation, out_grad),
        _kernel_grad_dilation_phases(inputs, out_grad, kernel=kernel, pads=pads, dilation=dilation),
    )


_conv_dilated_gpu.defvjp(_conv_dilated_gpu_fwd, _conv_dilated_gpu_bwd)


def _ffi_available() -> bool:
    # Built only where the CPU is the default backend: elsewhere the CPU branch is traced, never run.
    return jax.default_backend() == "cpu" and conv_ffi.available()


def _kernel_grad_native(inputs, out_grad, *, kernel, strides, pads, dilation):
    """XLA's own kernel gradient (the transpose of the convolution in its kernel)."""
    (kernel_grad,) = jax.linear_transpose(
        lambda k: _lax_conv(inputs, k, strides, pads, dilation), kernel
    )(out_grad)
    return kernel_grad


def _kernel_grad_dilation_phases(inputs, out_grad, *, kernel, pads, dilation):
    """Kernel gradient of a stride-1 dilated convolution as an undilated one over phase images.

    With output rows y = dh*u + a (a < dh) and columns x = dw*v + b, the input pixel a kernel tap
    (i, j) meets, x_pad[dh*(u + i) + a, dw*(v + j) + b], is pixel (u + i, v + j) of the phase image
    x_pad[a::dh, b::dw]. So dK is the undilated VALID kernel gradient of the dh*dw phase images
    stacked on the batch axis against the matching phases of the cotangent.
    """
    kh, kw = kernel.shape[:2]
    dh, dw = dilation
    n, ho, wo, _ = out_grad.shape
    ho_padded, wo_padded = -(-ho // dh) * dh, -(-wo // dw) * dw
    # Zero cotangent rows/columns (they add nothing) make Ho, Wo multiples of the dilation; the
    # input is cropped or zero-padded (negative or positive high pads) to the rows and columns those outputs reach.
    grads = jnp.pad(out_grad, ((0, 0), (0, ho_padded - ho), (0, wo_padded - wo), (0, 0)))
    height, width = ho_padded + (kh - 1) * dh, wo_padded + (kw - 1) * dw
    top, left = pads[0][0], pads[1][0]
    x = lax.pad(
        inputs,
        jnp.zeros((), inputs.dtype),
        ((0, 0, 0), (top, height - inputs.shape[1] - top, 0), (left, width - inputs.shape[2] - left, 0), (0, 0, 0)),
    )

    def phases(array: jax.Array) -> jax.Array:
        """(N, dh*H, dw*W, C) -> (dh*dw*N, H, W, C), phase (a, b) holding array[:, a::dh, b::dw]."""
        _, rows, cols, channels = array.shape
        split = array.reshape(n, rows // dh, dh, cols // dw, dw, channels)
        return split.transpose(2, 4, 0, 1, 3, 5).reshape(dh * dw * n, rows // dh, cols // dw, channels)

    return _kernel_grad_native(
        phases(x), phases(grads), kernel=kernel, strides=(1, 1), pads=((0, 0), (0, 0)), dilation=(1, 1)
    )


def _kernel_grad_matmul(inputs, out_grad, *, kernel_shape, strides, pads, dilation, chunk_positions=None):
    """Kernel gradient (kh, kw, Cin, Cout) as matrix products contracting N*Ho*Wo (module doc).

    The output rows are processed in chunks of about `chunk_positions` positions (default
    `CHUNK_POSITIONS`) so that the shifted copies of each chunk stay in cache instead of
    materialising kh (or kh*kw) copies of the whole input.
    """
    kh, kw, cin, cout = kernel_shape
    (sh, sw), (dh, dw) = strides, dilation
    n, ho, wo, _ = out_grad.shape
    split = sw == 1 and kh * cin + kw * cout < kh * kw * cin + cout
    row_positions = n * (wo + (kw - 1) * dw if split else wo)
    target_rows = max(1, (chunk_positions or CHUNK_POSITIONS) // row_positions)
    chunks = -(-ho // target_rows)
    chunk_rows = -(-ho // chunks)
    padded_height = inputs.shape[1] + pads[0][0] + pads[0][1]
    # Zero cotangent rows pad Ho to chunks * chunk_rows (they add nothing); the input gets the
    # matching extra bottom rows so the last chunk's window stays in bounds.
    extra_rows = max(0, (chunks * chunk_rows - 1) * sh + (kh - 1) * dh + 1 - padded_height)
    x = lax.pad(
        inputs,
        jnp.zeros((), inputs.dtype),
        ((0, 0, 0), (pads[0][0], pads[0][1] + extra_rows, 0), (*pads[1], 0), (0, 0, 0)),
    )
    # The cotangent is zero padded along the width once, (kw-1)*dw columns each side, so that its
    # kw column shifts are plain windows of it: per-chunk pads inside the loop cost more.
    width_pad = (kw - 1) * dw if split else 0
    grads = jnp.pad(out_grad, ((0, 0), (0, chunks * chunk_rows - ho), (width_pad, width_pad), (0, 0)))

    def view(first_input_row, i: int, j: int, width: int, col_stride: int) -> jax.Array:
        """x[:, first_input_row + i*dh + y*sh, j*dw + x*col_stride, :] for y < chunk_rows and x < width."""
        rows = lax.dynamic_slice(
            x, (0, first_input_row + i * dh, j * dw, 0), (n, (chunk_rows - 1) * sh + 1, (width - 1) * col_stride + 1, cin)
        )
        return rows[:, ::sh, ::col_stride]

    def chunk_product(chunk) -> jax.Array:
        """(kh*Cin, kw*Cout) if split else (kh*kw*Cin, Cout) for one chunk of output rows."""
        # Every shifted view is sliced straight out of the whole array inside the concatenation, so
        # each chunk's operands are written once, without intermediate window copies.
        first_row = chunk * chunk_rows
        if split:
            width = wo + (kw - 1) * dw
            rows = jnp.concatenate([view(first_row * sh, i, 0, width, 1) for i in range(kh)], axis=-1)
            shifted_grads = jnp.concatenate(
                [lax.dynamic_slice(grads, (0, first_row, (kw - 1 - j) * dw, 0), (n, chunk_rows, width, cout)) for j in range(kw)],
                axis=-1,
            )
            return _contract_positions(rows, shifted_grads)
        patches = jnp.concatenate(
            [view(first_row * sh, i, j, wo, sw) for i in range(kh) for j in range(kw)], axis=-1
        )
        return _contract_positions(patches, lax.dynamic_slice_in_dim(grads, first_row, chunk_rows, axis=1))

    if chunks == 1:
        product = chunk_product(0)
    else:
        shape = (kh * cin, kw * cout) if split else (kh * kw * cin, cout)
        product = lax.fori_loop(
            0, chunks, lambda chunk, total: total + chunk_product(chunk), jnp.zeros(shape, jnp.float32)
        )
    if split:
        return product.reshape(kh, cin, kw, cout).transpose(0, 2, 1, 3)
    return product.reshape(kh, kw, cin, cout)


def _contract_positions(left: jax.Array, right: jax.Array) -> jax.Array:
    """(N, h, w, A), (N, h, w, B) -> (A, B) summed over all positions, accumulated in float32."""
    # Float32 operands: XLA's CPU dot has no bf16 x bf16 -> f32 kernel (and this runs on CPU only).
    return lax.dot_general(
        left.reshape(-1, left.shape[-1]).astype(jnp.float32),
        right.reshape(-1, right.shape[-1]).astype(jnp.float32),
        (((0,), (0,)), ((), ())),
    )
