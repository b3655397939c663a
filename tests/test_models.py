"""Tests of neuroseg_jax.models: registry, blocks, every registered model at tiny widths, the
TransUNet checkpoint loader and the sharding rules. Inputs are <= 64x64 and widths <= 8 so the file
stays fast on a shared CPU."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec

from neuroseg_jax import ops
from neuroseg_jax.models import (
    MODELS,
    create_model,
    layers,
    load_pretrained_npz,
    partition_specs,
    sharding_rules,
)

TINY_TRANSFORMER = dict(hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32, img_size=32)
REQUIRED_NAMES = {
    "unet", "unetpp", "attention_unet", "deeplabv3plus", "resunet", "neurosegnet",
    "neurosegnet_msdb", "imsahlo", "transunet", "transunet_r50_b16", "transunet_vit_b16",
    "transunet_r50_l16", "transunet_r50_l32", "transunet_vit_l16",
}
# "transunet" is "transunet_r50_b16"; the ViT-L/16 variants run exactly the code of the B variants with
# other numbers: their sizes are checked with eval_shape below instead of another forward/backward.
# R50-ViT-L/32 needs inputs divisible by 32 and has its own tiny forward/backward test.
# Ladder steps whose blocks are covered by resunet + imsahlo are marked slow (-m "not slow" skips).
_COVERED_ELSEWHERE = ("neurosegnet", "neurosegnet_msdb", "transunet_vit_b16")
TRAINED_NAMES = [
    pytest.param(name, marks=pytest.mark.slow) if name in _COVERED_ELSEWHERE else name
    for name in sorted(MODELS)
    if name not in ("transunet_r50_l16", "transunet_r50_l32", "transunet_vit_l16", "transunet_r50_b16")
]


def tiny_kwargs(name: str) -> dict:
    """Tiny variants: fewer levels / ResNet units keep XLA compile time (the dominant cost) low."""
    if name.startswith("transunet"):
        return dict(width=4, resnet_units=(1, 1, 1), **TINY_TRANSFORMER)
    if name == "deeplabv3plus":
        return dict(width=4)
    return dict(width=4, depth=1)


def random_params(model: nn.Module, *inputs: jax.Array, seed: int = 0):
    """Parameters with the shapes of `model.init`, drawn with numpy.

    Compiling flax's initialisers (one threefry graph per parameter) costs tens of seconds on a
    loaded 2-core CPU, so the per-model tests take shapes from `jax.eval_shape(model.init)` and fill
    kernels with N(0, 1 / fan_in), norm scales with 1 and biases with small noise.
    """
    shapes = jax.eval_shape(model.init, jax.random.key(0), *inputs)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            return jnp.ones(leaf.shape, leaf.dtype)
        if name in ("bias", "mean"):
            return jnp.asarray(0.01 * rng.normal(size=leaf.shape), leaf.dtype)
        if name == "var":
            return jnp.ones(leaf.shape, leaf.dtype)
        fan_in = max(int(np.prod(leaf.shape[:-1])), 1)
        return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def test_registry_has_every_required_model():
    assert REQUIRED_NAMES <= set(MODELS)


def test_unknown_model_and_argument_are_named():
    with pytest.raises(ValueError, match="nosuchnet.*known models.*imsahlo"):
        create_model("nosuchnet")
    with pytest.raises(ValueError, match="wdth"):
        create_model("unet", wdth=4)


def test_size_not_divisible_is_a_clear_error():
    model = create_model("imsahlo", width=2)
    with pytest.raises(ValueError, match=r"30x32.*16"):
        model.init(jax.random.key(0), jnp.zeros((1, 30, 32, 1)))


@pytest.mark.parametrize("name", TRAINED_NAMES)
def test_model_forward_shapes_and_gradients(name):
    """Forward+backward at 32x32, forward at 16x48; every parameter leaf gets a finite, nonzero grad.

    Conv nets use depth=1 (one level of each loop) and TransUNet one unit per ResNet stage: XLA
    compile time, not compute, dominates here.
    """
    model = create_model(name, num_classes=2, **tiny_kwargs(name))
    images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 1))
    variables = random_params(model, images)
    params = variables["params"]

    target = jax.random.normal(jax.random.key(2), (2, 32, 32, 2))

    def loss_fn(params, images):
        logits, features = model.apply(
            {"params": params}, images, train=True, return_features=True, rngs={"dropout": jax.random.key(3)}
        )
        return jnp.mean(logits * target) + 1e-3 * jnp.mean(features), (logits, features)

    grads, (logits, features) = jax.jit(jax.grad(loss_fn, has_aux=True))(params, images)
    assert logits.shape == (2, 32, 32, 2) and logits.dtype == jnp.float32
    assert features.shape[:3] == (2, 32, 32) and features.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))
    flat = traverse_util.flatten_dict(grads, sep="/")
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in flat.values())
    zero = [path for path, g in flat.items() if not bool(jnp.any(g != 0))]
    assert not zero, f"{name}: parameters without gradient: {zero}"

    other = jax.random.uniform(jax.random.key(4), (1, 16, 48, 1))
    logits_other = jax.jit(model.apply)(variables, other)
    assert logits_other.shape == (1, 16, 48, 2)
    assert bool(jnp.all(jnp.isfinite(logits_other)))


def test_batch_norm_keeps_explicit_statistics():
    model = create_model("resunet", width=4, depth=1, norm="batch")
    images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 1))
    variables = random_params(model, images)
    assert "batch_stats" in variables
    train_apply = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(2)}))
    _, updates = train_apply(variables, images)
    before = jax.tree.leaves(variables["batch_stats"])
    after = jax.tree.leaves(updates["batch_stats"])
    assert any(not np.allclose(b, a) for b, a in zip(before, after))
    assert jax.jit(model.apply)({**variables, **updates}, images).shape == (2, 32, 32, 1)


def test_unetpp_deep_supervision_sows_every_head():
    model = create_model("unetpp", width=2, depth=2, deep_supervision=True)
    images = jnp.ones((1, 32, 32, 1))
    variables = random_params(model, images)
    logits, state = jax.jit(lambda v, x: model.apply(v, x, mutable=["intermediates"]))(variables, images)
    (heads,) = state["intermediates"]["deep_supervision_logits"]
    assert len(heads) == 2
    np.testing.assert_allclose(logits, jnp.mean(jnp.stack(heads), axis=0), rtol=1e-6)


CONV_CASES = [
    dict(kernel_size=(3, 3)),
    dict(kernel_size=(3, 1), strides=2, padding=1),
    dict(kernel_size=(3, 3), kernel_dilation=2, feature_group_count=2),
    dict(kernel_size=(2, 2), padding="VALID", use_bias=False),
    dict(kernel_size=(4, 4), strides=4, padding="VALID"),  # patch-embedding path
]


def test_conv_matches_flax_conv():
    x = jax.random.normal(jax.random.key(0), (2, 9, 8, 4))
    for kwargs in CONV_CASES:
        ours = layers.Conv(6, **kwargs)
        params = random_params(ours, x)
        assert set(params["params"]) == ({"kernel", "bias"} if kwargs.get("use_bias", True) else {"kernel"})
        reference = nn.Conv(6, **kwargs)
        np.testing.assert_allclose(
            ours.apply(params, x), reference.apply(params, x), rtol=1e-5, atol=1e-5, err_msg=str(kwargs)
        )


def test_weight_standardised_conv_ignores_kernel_scale():
    x = jax.random.normal(jax.random.key(0), (1, 8, 8, 3))
    conv = layers.WSConv(5, 3, use_bias=False)
    params = random_params(conv, x)
    scaled = jax.tree.map(lambda p: 7.0 * p + 0.5, params)
    # Equal up to the 1e-5 variance epsilon, whose relative weight changes with the scale.
    np.testing.assert_allclose(conv.apply(params, x), conv.apply(scaled, x), rtol=2e-3, atol=2e-3)


def test_upsample2x_equals_bilinear_resize():
    x = jax.random.normal(jax.random.key(0), (2, 5, 7, 3))
    np.testing.assert_allclose(ops.upsample2x(x), ops.resize_to(x, (10, 14)), atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 8, 12, 3), (1, 7, 9, 2)])
def test_max_pool2x_equals_flax_max_pool_in_value_and_gradient(shape):
    x = jax.random.normal(jax.random.key(1), shape)  # continuous values: no ties

    def reference(v):
        return nn.max_pool(v, (2, 2), strides=(2, 2))

    np.testing.assert_array_equal(ops.max_pool2x(x), reference(x))
    weights = jax.random.normal(jax.random.key(2), reference(x).shape)
    ours = jax.jit(jax.grad(lambda v: jnp.sum(ops.max_pool2x(v) * weights)))(x)
    theirs = jax.grad(lambda v: jnp.sum(reference(v) * weights))(x)
    np.testing.assert_array_equal(ours, theirs)


def test_max_pool2x_gives_ties_gradient_to_the_first_maximum():
    # Every window pattern of maxima among {0, 1}: 16 windows of a 8x8 map, one channel.
    patterns = np.array([[(code >> bit) & 1 for bit in range(4)] for code in range(16)], np.float32)
    x = jnp.asarray(patterns.reshape(4, 4, 2, 2).transpose(0, 2, 1, 3).reshape(1, 8, 8, 1))
    weights = jnp.arange(1.0, 17.0).reshape(1, 4, 4, 1)
    ours = jax.grad(lambda v: jnp.sum(ops.max_pool2x(v) * weights))(x)
    theirs = jax.grad(lambda v: jnp.sum(nn.max_pool(v, (2, 2), strides=(2, 2)) * weights))(x)
    np.testing.assert_array_equal(ops.max_pool2x(x), nn.max_pool(x, (2, 2), strides=(2, 2)))
    np.testing.assert_array_equal(ours, theirs)
    assert float(jnp.sum(ours)) == float(jnp.sum(weights))  # each window's cotangent lands once


@pytest.mark.parametrize("shape,groups", [((2, 6, 5, 8), 4), ((1, 4, 4, 6), 3), ((2, 3, 3, 4), 1)])
def test_group_norm_equals_flax_group_norm(shape, groups):
    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), shape)
    ours, theirs = layers.GroupNorm(num_groups=groups, epsilon=1e-5), nn.GroupNorm(num_groups=groups, epsilon=1e-5)
    params = ours.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, theirs.init(jax.random.key(1), x))
    params = jax.tree.map(lambda p: p + jax.random.uniform(jax.random.key(2), p.shape), params)
    np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), rtol=1e-5, atol=1e-5)
    weights = jax.random.normal(jax.random.key(3), shape)

    def grads(module, transform=lambda f: f):
        return transform(jax.grad(lambda p, v: jnp.sum(module.apply(p, v) * weights), (0, 1)))(params, x)

    # Ours has its own backward pass (a custom VJP): eager and under jit against flax's autodiff.
    for transform in (lambda f: f, jax.jit):
        for mine, reference in zip(jax.tree.leaves(grads(ours, transform)), jax.tree.leaves(grads(theirs))):
            np.testing.assert_allclose(mine, reference, rtol=1e-4, atol=1e-4)
    low = layers.GroupNorm(num_groups=groups, dtype=jnp.bfloat16).apply(params, x)
    assert low.dtype == jnp.bfloat16


def test_guarded_max_matches_jnp_max_with_ties():
    x = jnp.array([[[[1.0, 3.0], [3.0, 0.0]], [[2.0, -1.0], [3.0, 3.0]]]])  # (1, 2, 2, 2), with ties
    weights = jnp.array([2.0, -1.0])
    for axis in ((1, 2), -1):
        np.testing.assert_array_equal(ops.guarded_max(x, axis), jnp.max(x, axis, keepdims=True))
        ours = jax.jit(jax.grad(lambda v: jnp.sum(ops.guarded_max(v, axis) * weights)))(x)
        theirs = jax.grad(lambda v: jnp.sum(jnp.max(v, axis, keepdims=True) * weights))(x)
        np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def test_blocks_shapes_and_semantics():
    x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 8))
    coarse = jnp.ones((2, 8, 8, 12))
    blocks = {
        "msdb": (layers.MultiScaleDenseBlock(6), (x,)),
        "attention": (layers.HierarchicalAttention(reduction=2), (x,)),
        "gate": (layers.AttentionGate(4), (x, coarse)),
        "aspp": (layers.ASPP(5, rates=(1, 2)), (x,)),
        "se": (layers.SqueezeExcite(reduction=2), (x,)),
        "residual": (layers.ResidualBlock(6, strides=2, se=True), (x,)),
    }
    params = {name: random_params(block, *args) for name, (block, args) in blocks.items()}

    @jax.jit
    def run_all(params):
        return {name: block.apply(params[name], *args) for name, (block, args) in blocks.items()}

    out = run_all(params)
    assert out["msdb"].shape == (2, 16, 16, 6)
    assert out["attention"].shape == x.shape
    # Scores are sigmoids applied multiplicatively, so 0 <= out <= x for x >= 0.
    assert bool(jnp.all(out["attention"] <= x + 1e-6)) and bool(jnp.all(out["attention"] >= 0))
    assert out["gate"].shape == x.shape
    assert out["aspp"].shape == (2, 16, 16, 5)
    assert out["se"].shape == x.shape
    assert out["residual"].shape == (2, 8, 8, 6)

    key = jax.random.key(1)
    dropped = layers.SpatialDropout(0.5).apply({}, jnp.ones((4, 6, 6, 16)), train=True, rngs={"dropout": key})
    per_channel = dropped.reshape(4, 36, 16)
    # Whole channels are dropped: each (sample, channel) column is constant (0 or 1 / keep rate).
    assert bool(jnp.all(per_channel.max(axis=1) == per_channel.min(axis=1)))
    assert bool(jnp.any(per_channel == 0)) and bool(jnp.any(per_channel == 2.0))


def np_conv_same(x: np.ndarray, kernel: np.ndarray, dilation: int = 1) -> np.ndarray:
    """Stride-1 'SAME' cross-correlation of (B, H, W, C) with an odd (k, k, C, O) kernel, written as
    a loop over taps: tap (i, j) reads the zero-padded input shifted by (i * dilation, j * dilation)."""
    size = kernel.shape[0]
    pad = dilation * (size // 2)
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    height, width = x.shape[1:3]
    out = np.zeros((*x.shape[:3], kernel.shape[-1]))
    for i in range(size):
        for j in range(size):
            out += padded[:, i * dilation:i * dilation + height, j * dilation:j * dilation + width] @ kernel[i, j]
    return out


def np_swish(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def np_sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def perturbed(variables, scale: float, seed: int = 1):
    """Adds N(0, scale^2) noise to every parameter: norm scales away from 1, biases away from 0."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda v: v + jnp.asarray(scale * rng.normal(size=v.shape), v.dtype), variables)


def numpy_params(variables) -> dict[str, np.ndarray]:
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    return {path: np.asarray(value, np.float64) for path, value in flat.items()}


def np_msdb(x: np.ndarray, p: dict[str, np.ndarray], dilations=(1, 2, 4)) -> np.ndarray:
    """MSDB (IMSAHLO Fig. 3A) at widths <= 8, where GroupNorm has one channel per group:
    x0 = swish(norm(conv1x1 x)); branch k = swish(norm(conv3x3, dilation d_k, of [x0, y_1..y_{k-1}]));
    fused = norm(conv1x1 [x0, y_1..y_K]); SE; out = swish(SE(fused) + x0)."""

    def conv_norm(layer: int, inputs: np.ndarray, dilation: int = 1) -> np.ndarray:
        y = np_conv_same(inputs, p[f"ConvNormAct_{layer}/Conv_0/kernel"], dilation)
        mean, var = y.mean(axis=(1, 2), keepdims=True), y.var(axis=(1, 2), keepdims=True)
        norm = f"ConvNormAct_{layer}/Norm_0/GroupNorm_0"
        return (y - mean) / np.sqrt(var + 1e-5) * p[f"{norm}/scale"] + p[f"{norm}/bias"]

    features = [np_swish(conv_norm(0, x))]
    for layer, dilation in enumerate(dilations, start=1):
        features.append(np_swish(conv_norm(layer, np.concatenate(features, axis=-1), dilation)))
    fused = conv_norm(len(dilations) + 1, np.concatenate(features, axis=-1))
    squeezed = fused.mean(axis=(1, 2), keepdims=True)
    hidden = np_swish(squeezed @ p["SqueezeExcite_0/Conv_0/kernel"][0, 0] + p["SqueezeExcite_0/Conv_0/bias"])
    gate = np_sigmoid(hidden @ p["SqueezeExcite_0/Conv_1/kernel"][0, 0] + p["SqueezeExcite_0/Conv_1/bias"])
    return np_swish(fused * gate + features[0])


def np_hierarchical_attention(x: np.ndarray, p: dict[str, np.ndarray], channel_first: bool = True) -> np.ndarray:
    """HA (IMSAHLO Fig. 3B): channel attention ("what") on x, then spatial attention ("where") on its
    output; `channel_first=False` is the other order, for the test's sensitivity check."""

    def channel(v: np.ndarray) -> np.ndarray:
        def mlp(pooled):
            hidden = np_swish(pooled @ p["channel_mlp_in/kernel"][0, 0] + p["channel_mlp_in/bias"])
            return hidden @ p["channel_mlp_out/kernel"][0, 0] + p["channel_mlp_out/bias"]

        return v * np_sigmoid(mlp(v.mean(axis=(1, 2), keepdims=True)) + mlp(v.max(axis=(1, 2), keepdims=True)))

    def spatial(v: np.ndarray) -> np.ndarray:
        statistics = np.concatenate([v.mean(axis=-1, keepdims=True), v.max(axis=-1, keepdims=True)], axis=-1)
        return v * np_sigmoid(np_conv_same(statistics, p["spatial_conv/kernel"]) + p["spatial_conv/bias"])

    return spatial(channel(x)) if channel_first else channel(spatial(x))


def test_multi_scale_dense_block_matches_numpy_with_dilations_1_2_4():
    """Default MSDB (dilations 1, 2, 4; dense inputs; GroupNorm, Swish, SE) against a numpy loop
    computation at 11x12, wide enough for the dilation-4 taps; other rates give other outputs."""
    x = jax.random.normal(jax.random.key(0), (2, 11, 12, 2))
    block = layers.MultiScaleDenseBlock(3, growth=2)
    variables = perturbed(random_params(block, x), 0.3)
    params = numpy_params(variables)
    expected = np_msdb(np.asarray(x, np.float64), params)
    np.testing.assert_allclose(jax.jit(block.apply)(variables, x), expected, rtol=1e-5, atol=1e-5)
    for other in ((1, 2, 3), (1, 1, 1), (4, 2, 1)):
        assert np.max(np.abs(np_msdb(np.asarray(x, np.float64), params, other) - expected)) > 1e-2, other


def test_hierarchical_attention_is_channel_then_spatial():
    """HA against numpy: channel scores from the average- and max-pooled map through a shared
    1x1-Swish-1x1 MLP, then spatial scores from a 7x7 conv of the channel mean and max of the
    channel-weighted map; the reverse order differs by far more than the tolerance."""
    x = jax.random.normal(jax.random.key(0), (2, 9, 10, 4))
    block = layers.HierarchicalAttention(reduction=2)
    variables = perturbed(random_params(block, x), 0.5)
    params = numpy_params(variables)
    expected = np_hierarchical_attention(np.asarray(x, np.float64), params)
    np.testing.assert_allclose(jax.jit(block.apply)(variables, x), expected, rtol=1e-5, atol=1e-6)
    reversed_order = np_hierarchical_attention(np.asarray(x, np.float64), params, channel_first=False)
    assert np.max(np.abs(reversed_order - expected)) > 1e-2


def test_transunet_published_sizes_and_checkpoint_names():
    """Full-size models via eval_shape (no compute): R50-ViT-B/16 ~105M parameters at 224x224."""
    images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    shapes = jax.eval_shape(create_model("transunet", num_classes=9).init, jax.random.key(0), images)["params"]
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))
    assert 104.5e6 < count < 106.0e6, count
    flat = {path: leaf.shape for path, leaf in traverse_util.flatten_dict(shapes, sep="/").items()}
    expected = {
        "resnet/conv_root/kernel": (7, 7, 3, 64),
        "resnet/gn_root/scale": (64,),
        "resnet/block1/unit1/conv_proj/kernel": (1, 1, 64, 256),
        "resnet/block3/unit9/conv3/kernel": (1, 1, 256, 1024),
        "embedding/kernel": (1, 1, 1024, 768),
        "Transformer/posembed_input/pos_embedding": (1, 14, 14, 768),
        "Transformer/encoderblock_11/MultiHeadDotProductAttention_1/query/kernel": (768, 12, 64),
        "Transformer/encoderblock_11/MultiHeadDotProductAttention_1/out/kernel": (12, 64, 768),
        "Transformer/encoderblock_11/MlpBlock_3/Dense_0/kernel": (768, 3072),
        "Transformer/encoder_norm/scale": (768,),
    }
    for path, shape in expected.items():
        assert flat[path] == shape, path
    large = jax.eval_shape(create_model("transunet_vit_l16").init, jax.random.key(0), images)["params"]
    assert "Transformer/encoderblock_23/LayerNorm_0/scale" in traverse_util.flatten_dict(large, sep="/")
    assert "resnet" not in large
    assert large["Transformer"]["encoder_norm"]["scale"].shape == (1024,)


def public_checkpoint_layout(
    *, width: int, units: tuple[int, ...], hidden: int, heads: int, mlp_dim: int, layers: int, grid: int,
    cell: int, merged_heads: bool = False, norms_4d: bool = False,
) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a ViT checkpoint as google-research/vision_transformer releases it
    (R50+ViT-B_16.npz, ViT-B_16.npz, ...) and TransUNet's `load_from` reads it, written from that
    layout, not from the model: the hybrid's ResNet at the top level ('conv_root', 'gn_root',
    'block{b}/unit{u}/conv1..3, gn1..3, conv_proj, gn_proj'; `units` empty for a pure ViT), HWIO conv
    kernels, flax Dense (in, out) kernels, attention with separate heads ((D, heads, D / heads) query,
    key and value kernels, (heads, D / heads, D) output kernel), a position table of the
    `grid` x `grid` patches after a class token, and the classifier ('cls', 'pre_logits', 'head').
    `cell`: the embedding's patch side (16 for ViT-B/16 on pixels, 1 for R50+ViT-B/16 on the H/16
    ResNet map). Variants of other exports: `merged_heads` stores attention as (D, D) kernels and (D,)
    biases, `norms_4d` stores GroupNorm parameters as (1, 1, 1, C).
    """
    layout: dict[str, tuple[int, ...]] = {}

    def group_norm(prefix: str, channels: int) -> None:
        shape = (1, 1, 1, channels) if norms_4d else (channels,)
        layout[f"{prefix}/scale"] = layout[f"{prefix}/bias"] = shape

    channels = 3
    if units:
        layout["conv_root/kernel"] = (7, 7, 3, width)
        group_norm("gn_root", width)
        channels = width
        for block, count in enumerate(units, start=1):
            mid = width * 2 ** (block - 1)
            out = 4 * mid
            for unit in range(1, count + 1):
                prefix = f"block{block}/unit{unit}"
                layout[f"{prefix}/conv1/kernel"] = (1, 1, channels, mid)
                layout[f"{prefix}/conv2/kernel"] = (3, 3, mid, mid)
                layout[f"{prefix}/conv3/kernel"] = (1, 1, mid, out)
                for norm, size in (("gn1", mid), ("gn2", mid), ("gn3", out)):
                    group_norm(f"{prefix}/{norm}", size)
                if unit == 1:  # stride or width changes: projected shortcut
                    layout[f"{prefix}/conv_proj/kernel"] = (1, 1, channels, out)
                    group_norm(f"{prefix}/gn_proj", out)
                channels = out
    layout["embedding/kernel"] = (cell, cell, channels, hidden)
    layout["embedding/bias"] = (hidden,)
    layout["cls"] = (1, 1, hidden)
    layout["Transformer/posembed_input/pos_embedding"] = (1, 1 + grid * grid, hidden)
    head_dim = hidden // heads
    for index in range(layers):
        block = f"Transformer/encoderblock_{index}"
        for norm in ("LayerNorm_0", "LayerNorm_2"):
            layout[f"{block}/{norm}/scale"] = layout[f"{block}/{norm}/bias"] = (hidden,)
        attention = f"{block}/MultiHeadDotProductAttention_1"
        for projection in ("query", "key", "value"):
            layout[f"{attention}/{projection}/kernel"] = (hidden, hidden) if merged_heads else (hidden, heads, head_dim)
            layout[f"{attention}/{projection}/bias"] = (hidden,) if merged_heads else (heads, head_dim)
        layout[f"{attention}/out/kernel"] = (hidden, hidden) if merged_heads else (heads, head_dim, hidden)
        layout[f"{attention}/out/bias"] = (hidden,)
        layout[f"{block}/MlpBlock_3/Dense_0/kernel"] = (hidden, mlp_dim)
        layout[f"{block}/MlpBlock_3/Dense_0/bias"] = (mlp_dim,)
        layout[f"{block}/MlpBlock_3/Dense_1/kernel"] = (mlp_dim, hidden)
        layout[f"{block}/MlpBlock_3/Dense_1/bias"] = (hidden,)
    layout["Transformer/encoder_norm/scale"] = layout["Transformer/encoder_norm/bias"] = (hidden,)
    layout["pre_logits/kernel"] = (hidden, hidden)
    layout["pre_logits/bias"] = (hidden,)
    layout["head/kernel"] = (hidden, 10)
    layout["head/bias"] = (10,)
    return layout


def random_checkpoint(layout: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    """Independent normal draws: every array, and so its raw bytes, is unique."""
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in layout.items()}


# name, registry model, patch side of its embedding, checkpoint variant
CHECKPOINT_CASES = {
    "r50_b16": ("transunet_r50_b16", 1, {}),
    "r50_b16_merged_heads_4d_norms": ("transunet_r50_b16", 1, dict(merged_heads=True, norms_4d=True)),
    "r50_l32": ("transunet_r50_l32", 2, {}),
    "vit_b16": ("transunet_vit_b16", 16, {}),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_load_pretrained_npz_reads_the_public_checkpoint_layout(tmp_path, case):
    """A checkpoint in the public layout loads; each of its arrays lands, bit for bit and in its
    order, in the model parameter its name says, each one once; the position table drops the class
    token and is resized as the public loaders resize it (`scipy.ndimage.zoom`, order 1: first and
    last rows/columns are the corners of the 4x4 table, a middle column the mean of two)."""
    name, cell, variant = CHECKPOINT_CASES[case]
    hybrid = name.startswith("transunet_r50")
    width, units, hidden, heads, mlp_dim, layers_count = 4, (1, 2, 1), 16, 2, 32, 2
    patch = 16 * cell if hybrid else cell
    model = create_model(
        name, width=width, resnet_units=units, hidden_size=hidden, num_heads=heads, mlp_dim=mlp_dim,
        num_layers=layers_count, img_size=(2 * patch, 3 * patch),
    )
    images = jnp.ones((1, 2 * patch, 3 * patch, 3))
    params = random_params(model, images)["params"]
    layout = public_checkpoint_layout(
        width=width, units=units if hybrid else (), hidden=hidden, heads=heads, mlp_dim=mlp_dim,
        layers=layers_count, grid=4, cell=cell, **variant,
    )
    checkpoint = random_checkpoint(layout)
    path = tmp_path / "R50+ViT-B_16.npz"
    np.savez(path, **checkpoint)

    flat = traverse_util.flatten_dict(load_pretrained_npz(params, path), sep="/")
    position = "Transformer/posembed_input/pos_embedding"
    # Public names are the model's encoder paths without the 'resnet/' prefix of the CNN: every
    # encoder parameter holds the array of its name, in that array's element order (a transposed
    # copy fails), and together they use each checkpoint array but the classifier's once.
    used = []
    for parameter, value in flat.items():
        if parameter.startswith(("resnet/", "embedding/", "Transformer/")) and parameter != position:
            source = parameter.removeprefix("resnet/")
            np.testing.assert_array_equal(value, checkpoint[source].reshape(value.shape), parameter)
            used.append(source)
    unused = {"cls", "pre_logits/kernel", "pre_logits/bias", "head/kernel", "head/bias", position}
    assert sorted(used) == sorted(set(checkpoint) - unused)
    assert flat["embedding/kernel"].shape == (cell, cell, 16 * width if hybrid else 3, hidden)
    attention = "Transformer/encoderblock_1/MultiHeadDotProductAttention_1"
    assert flat[f"{attention}/query/kernel"].shape == (hidden, heads, hidden // heads)
    assert flat[f"{attention}/out/kernel"].shape == (heads, hidden // heads, hidden)

    table = checkpoint[position][0, 1:].reshape(4, 4, hidden)
    columns = lambda row: [row[0], (row[1] + row[2]) / 2, row[3]]  # 4 -> 3: positions 0, 1.5, 3
    expected = np.stack([columns(table[0]), columns(table[3])])[None]  # 4 -> 2: rows 0 and 3
    np.testing.assert_allclose(flat[position], expected, rtol=1e-6, atol=1e-7)

    for parameter in ("conv_more/Conv_0/kernel", "head/kernel"):
        np.testing.assert_array_equal(flat[parameter], traverse_util.flatten_dict(params, sep="/")[parameter])
    if case == "r50_b16":
        loaded = traverse_util.unflatten_dict(flat, sep="/")
        assert jax.jit(model.apply)({"params": loaded}, images).shape == (1, 32, 48, 1)


def test_load_pretrained_npz_names_what_is_wrong(tmp_path):
    model = create_model("transunet_r50_b16", width=4, resnet_units=(1, 1, 1), **TINY_TRANSFORMER)
    params = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))["params"]
    layout = public_checkpoint_layout(
        width=4, units=(1, 1, 1), hidden=16, heads=2, mlp_dim=32, layers=1, grid=2, cell=1
    )
    checkpoint = random_checkpoint(layout)
    del checkpoint["block1/unit1/gn1/bias"]
    with pytest.raises(KeyError, match="block1/unit1/gn1/bias"):
        load_pretrained_npz(params, checkpoint)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_pretrained_npz(params, tmp_path / "missing.npz")
    for source, wrong in (
        ("conv_root/kernel", lambda k: k.transpose(3, 2, 0, 1)),  # PyTorch's OIHW
        ("embedding/kernel", lambda k: k[:, :, :8]),
        ("Transformer/encoderblock_0/MultiHeadDotProductAttention_1/out/kernel", lambda k: k[:1]),
    ):
        intact = random_checkpoint(layout)
        broken = {**intact, source: wrong(intact[source])}
        with pytest.raises(ValueError, match=source):
            load_pretrained_npz(params, broken)


def test_r50_l32_is_vit_l_on_32_pixel_patches():
    """MorphoSeg Table 3's R50-L32 as the ViT release's R50+ViT-L/32: ViT-L (24 layers, 16 heads,
    1024 wide, MLP 4096) on 2x2 patches of the H/16 ResNet map, a 7x7 token grid at 224 px; R50-L16
    is the same transformer on 1x1 patches (14x14). Full sizes via eval_shape (no compute)."""
    images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    for name, patch in (("transunet_r50_l32", 32), ("transunet_r50_l16", 16)):
        model = create_model(name, num_classes=2)
        variables = jax.eval_shape(model.init, jax.random.key(0), images)
        flat = {path: leaf.shape for path, leaf in traverse_util.flatten_dict(variables["params"], sep="/").items()}
        side = 224 // patch
        assert flat["embedding/kernel"] == (patch // 16, patch // 16, 1024, 1024), name
        assert flat["Transformer/posembed_input/pos_embedding"] == (1, side, side, 1024), name
        blocks = {path.split("/")[1] for path in flat if path.startswith("Transformer/encoderblock_")}
        assert blocks == {f"encoderblock_{index}" for index in range(24)}, name
        attention = "Transformer/encoderblock_23/MultiHeadDotProductAttention_1"
        assert flat[f"{attention}/query/kernel"] == (1024, 16, 64), name
        assert flat["Transformer/encoderblock_23/MlpBlock_3/Dense_0/kernel"] == (1024, 4096), name
        assert flat["resnet/block3/unit9/conv3/kernel"] == (1, 1, 256, 1024), name
        assert jax.eval_shape(model.apply, variables, images).shape == (1, 224, 224, 2), name

    from configs import morphoseg

    config = morphoseg.get_config("encoder=r50_l32")
    assert (config.model.name, config.model.patch_size, config.model.num_layers) == ("transunet_r50_l32", 32, 24)
    assert set(morphoseg.ENCODERS.values()) <= set(MODELS)


def test_r50_l32_tiny_forward_and_gradients():
    """The 32-pixel path runs: 2x2 patch embedding, one extra 2x upsampling before the CUP, skips at
    matching sizes; every parameter gets a finite, nonzero gradient. Inputs must be multiples of 32."""
    model = create_model("transunet_r50_l32", num_classes=2, width=4, resnet_units=(1, 1, 1),
                         **{**TINY_TRANSFORMER, "img_size": 64})
    images = jax.random.uniform(jax.random.key(0), (1, 64, 64, 1))
    params = random_params(model, images)["params"]
    target = jax.random.normal(jax.random.key(1), (1, 64, 64, 2))
    logits, grads = jax.jit(jax.value_and_grad(lambda p: jnp.mean(model.apply({"params": p}, images) * target)))(params)
    flat = traverse_util.flatten_dict(grads, sep="/")
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in flat.values())
    assert not [path for path, g in flat.items() if not bool(jnp.any(g != 0))]
    assert jax.eval_shape(model.apply, {"params": params}, images).shape == (1, 64, 64, 2)
    with pytest.raises(ValueError, match=r"48x48.*32"):
        model.apply({"params": params}, jnp.ones((1, 48, 48, 1)))
    with pytest.raises(ValueError, match="patch_size.*24"):
        create_model("transunet_r50_l32", patch_size=24).init(jax.random.key(0), jnp.ones((1, 48, 48, 3)))


def test_sharding_rules():
    assert sharding_rules("unet") == []
    with pytest.raises(ValueError, match="known models"):
        sharding_rules("nosuchnet")
    model = create_model("transunet", width=4, **TINY_TRANSFORMER)
    params = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 1), jnp.float32))["params"]
    specs = partition_specs(params, sharding_rules("transunet"), axis_sizes={"data": 4, "model": 2})
    block = specs["Transformer"]["encoderblock_0"]
    assert block["MultiHeadDotProductAttention_1"]["query"]["kernel"] == PartitionSpec(None, "model", None)
    assert block["MultiHeadDotProductAttention_1"]["out"]["kernel"] == PartitionSpec("model", None, None)
    assert block["MlpBlock_3"]["Dense_1"]["kernel"] == PartitionSpec("model", None)
    assert specs["resnet"]["conv_root"]["kernel"] == PartitionSpec()
    # A mesh axis that does not divide the dimension falls back to replication for that dim.
    odd = partition_specs(params, sharding_rules("transunet"), axis_sizes={"model": 3})
    assert odd["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_1"]["kernel"] == PartitionSpec()
    fsdp = partition_specs(params, [], axis_sizes={"data": 4}, fsdp_axis="data", fsdp_min_size=1000)
    assert fsdp["conv_more"]["Conv_0"]["kernel"] == PartitionSpec(None, None, None, "data")
    assert fsdp["head"]["bias"] == PartitionSpec()
