"""Forward-mode autodiff (jvp, jacfwd) through `neuroseg_jax.ops` and the models, per platform.

Off the CPU the ops are plain lax ops with JAX's own derivatives, so forward mode must lower there;
no TPU or GPU is needed to check that: `jax.export` lowers for a platform without running on it.
The values those branches compute are checked on the CPU against independent references. On the
CPU the custom VJPs stay (they are what makes the CPU fast) and forward mode raises, except with
conv='lax' for the convolution; guarded_max and upsample2x support it everywhere.
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from neuroseg_jax import ops
from neuroseg_jax.models import MODELS, create_model
from neuroseg_jax.ops import conv, norm, pooling
from test_models import tiny_kwargs  # tests/ is this file's directory

RNG = np.random.default_rng(0)
NHWC = ("NHWC", "HWIO", "NHWC")


def normal(*shape: int) -> jax.Array:
    return jnp.asarray(RNG.normal(size=shape), jnp.float32)


X, KERNEL = normal(2, 10, 12, 4), normal(3, 3, 4, 6)
SCALE, BIAS = 1.0 + 0.3 * normal(4), 0.3 * normal(4)
OPS = {
    "conv2d": lambda x: ops.conv2d(x, KERNEL),
    "conv2d dilated": lambda x: ops.conv2d(x, KERNEL, dilation=(2, 2)),
    "conv2d 1x1": lambda x: ops.conv2d(x, KERNEL[1:2, 1:2]),
    "group_norm": lambda x: ops.group_norm(x, SCALE, BIAS, num_groups=2, epsilon=1e-5),
    "max_pool2x": ops.max_pool2x,
    "guarded_max": lambda x: ops.guarded_max(x, (1, 2)),
}


def lowers_jvp(fn, platform: str, *args) -> bool:
    """Whether jit(jvp(fn)) lowers for `platform`; False when JAX refuses forward mode there."""
    tangents = jax.tree.map(jnp.ones_like, args)
    try:
        jax.export.export(jax.jit(lambda *a: jax.jvp(fn, a, tangents)), platforms=[platform])(*args)
    except TypeError as error:
        assert "forward-mode" in str(error), error
        return False
    return True


@pytest.mark.parametrize("name", sorted(OPS))
def test_forward_mode_lowers_off_the_cpu(name):
    assert lowers_jvp(OPS[name], "tpu", X)
    # NVIDIA/AMD GPUs keep a custom VJP for stride-1 dilated convolutions only (cuDNN's kernel gradient).
    assert lowers_jvp(OPS[name], "cuda", X) == (name != "conv2d dilated")


@pytest.mark.parametrize("name", ["conv2d", "conv2d dilated", "group_norm", "max_pool2x"])
def test_forward_mode_on_the_cpu_raises_for_the_custom_vjps(name):
    with pytest.raises(TypeError, match="forward-mode autodiff"):
        jax.jvp(OPS[name], (X,), (X,))


def test_portable_branches_compute_the_references_jvp():
    """The non-CPU branches, run on the CPU: their values and tangents against flax/lax references
    (the convolution's tangent by its bilinearity, conv(t, k))."""
    tangent = normal(*X.shape)
    pads = ((1, 1), (1, 1))
    value, jvp_value = jax.jvp(lambda x: conv._conv_or_product(x, KERNEL, (1, 1), pads, (1, 1)), (X,), (tangent,))
    np.testing.assert_allclose(value, lax.conv_general_dilated(X, KERNEL, (1, 1), "SAME", dimension_numbers=NHWC),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jvp_value, lax.conv_general_dilated(tangent, KERNEL, (1, 1), "SAME",
                                                                   dimension_numbers=NHWC), rtol=1e-5, atol=1e-5)

    flax_norm = nn.GroupNorm(num_groups=2, epsilon=1e-5)
    params = {"params": {"scale": SCALE, "bias": BIAS}}
    ours = jax.jvp(lambda x: norm._affine_group_norm(x, SCALE, BIAS, 2, 1e-5)[0], (X,), (tangent,))
    theirs = jax.jvp(lambda x: flax_norm.apply(params, x), (X,), (tangent,))
    for mine, reference in zip(ours, theirs):
        np.testing.assert_allclose(mine, reference, rtol=1e-4, atol=1e-4)

    ours = jax.jvp(lambda x: pooling._first_max_of_windows(x)[0], (X,), (tangent,))
    theirs = jax.jvp(lambda x: nn.max_pool(x, (2, 2), strides=(2, 2)), (X,), (tangent,))
    for mine, reference in zip(ours, theirs):
        np.testing.assert_array_equal(mine, reference)


def test_lax_convolution_jvp_and_jacfwd_on_the_cpu():
    x, kernel = normal(1, 5, 6, 2), normal(3, 3, 2, 3)
    x_tangent, kernel_tangent = normal(*x.shape), normal(*kernel.shape)

    def ours(x, k):
        return ops.conv2d(x, k, strides=(1, 2), dilation=(2, 1), implementation="lax")

    def plain(x, k):
        return lax.conv_general_dilated(x, k, (1, 2), "SAME", rhs_dilation=(2, 1), dimension_numbers=NHWC)

    _, tangent = jax.jvp(ours, (x, kernel), (x_tangent, kernel_tangent))
    np.testing.assert_allclose(tangent, plain(x_tangent, kernel) + plain(x, kernel_tangent), rtol=1e-5, atol=1e-5)
    jacobian = jax.jacfwd(lambda v: ours(v, kernel))(x)
    # The convolution is linear in x: its Jacobian applied to the tangent is the tangent's image.
    np.testing.assert_allclose(jnp.einsum("...ijkl,ijkl->...", jacobian, x_tangent), plain(x_tangent, kernel),
                               rtol=1e-4, atol=1e-4)


def test_guarded_max_and_upsample_jvp_on_the_cpu():
    x = jnp.array([[[[1.0], [3.0]], [[3.0], [0.0]]]])  # (1, 2, 2, 1): two maxima
    tangent = jnp.array([[[[5.0], [2.0]], [[4.0], [7.0]]]])
    value, jvp_value = jax.jvp(lambda v: ops.guarded_max(v, (1, 2)), (x,), (tangent,))
    assert float(value[0, 0, 0, 0]) == 3.0
    assert float(jvp_value[0, 0, 0, 0]) == 3.0  # the two maxima share: (2 + 4) / 2
    image, image_tangent = normal(1, 3, 4, 2), normal(1, 3, 4, 2)
    _, jvp_value = jax.jvp(ops.upsample2x, (image,), (image_tangent,))
    np.testing.assert_allclose(jvp_value, jax.image.resize(image_tangent, (1, 6, 8, 2), "bilinear"), atol=1e-5)


def imsahlo_jvp_lowers(platform: str, conv: str) -> bool:
    model = create_model("imsahlo", width=4, depth=1, conv=conv)
    images = jnp.zeros((1, 16, 16, 1))
    params = jax.eval_shape(model.init, jax.random.key(0), images)
    params = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), params)
    return lowers_jvp(lambda p: model.apply(p, images), platform, params)


def test_whole_model_forward_mode_off_the_cpu():
    """IMSAHLO (dilated dense blocks, GroupNorm, max pooling, hierarchical attention's maxima):
    forward mode lowers on TPUs as built, and on NVIDIA GPUs with conv='lax'."""
    assert imsahlo_jvp_lowers("tpu", "auto")
    assert not imsahlo_jvp_lowers("cuda", "auto")
    assert imsahlo_jvp_lowers("cuda", "lax")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_conv_key_reaches_every_convolution(name):
    """With conv='lax' no convolution of the model takes the CPU custom-VJP branch."""
    size = 32 if name == "transunet_r50_l32" else 16
    images = jnp.zeros((1, size, size, 1))

    def traced(conv: str) -> str:
        model = create_model(name, num_classes=1, conv=conv, **tiny_kwargs(name))
        return str(jax.make_jaxpr(lambda x: model.init(jax.random.key(0), x))(images))

    assert re.search(r"name=_conv_cpu\b", traced("auto"))
    assert not re.search(r"name=_conv_cpu\b", traced("lax"))


def test_unknown_conv_implementation_is_named():
    with pytest.raises(ValueError, match="conv='fast'.*auto.*lax"):
        create_model("unet", conv="fast")
    with pytest.raises(ValueError, match="implementation.*'fast'"):
        ops.conv2d(X, KERNEL, implementation="fast")
