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
    "transunet_r50_l16", "transunet_vit_l16",
}
# "transunet" is "transunet_r50_b16"; the ViT-L variants run exactly the code of the B variants with
# other numbers: their sizes are checked with eval_shape below instead of another forward/backward.
# Ladder steps whose blocks are covered by resunet + imsahlo are marked slow (-m "not slow" skips).
_COVERED_ELSEWHERE = ("neurosegnet", "neurosegnet_msdb", "transunet_vit_b16")
TRAINED_NAMES = [
    pytest.param(name, marks=pytest.mark.slow) if name in _COVERED_ELSEWHERE else name
    for name in sorted(MODELS)
    if name not in ("transunet_r50_l16", "transunet_vit_l16", "transunet_r50_b16")
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
    np.testing.assert_allclose(layers.upsample2x(x), layers.resize_to(x, (10, 14)), atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 8, 12, 3), (1, 7, 9, 2)])
def test_max_pool2x_equals_flax_max_pool_in_value_and_gradient(shape):
    x = jax.random.normal(jax.random.key(1), shape)  # continuous values: no ties

    def reference(v):
        return nn.max_pool(v, (2, 2), strides=(2, 2))

    np.testing.assert_array_equal(layers.max_pool2x(x), reference(x))
    weights = jax.random.normal(jax.random.key(2), reference(x).shape)
    ours = jax.jit(jax.grad(lambda v: jnp.sum(layers.max_pool2x(v) * weights)))(x)
    theirs = jax.grad(lambda v: jnp.sum(reference(v) * weights))(x)
    np.testing.assert_array_equal(ours, theirs)


def test_max_pool2x_gives_ties_gradient_to_the_first_maximum():
    # Every window pattern of maxima among {0, 1}: 16 windows of a 8x8 map, one channel.
    patterns = np.array([[(code >> bit) & 1 for bit in range(4)] for code in range(16)], np.float32)
    x = jnp.asarray(patterns.reshape(4, 4, 2, 2).transpose(0, 2, 1, 3).reshape(1, 8, 8, 1))
    weights = jnp.arange(1.0, 17.0).reshape(1, 4, 4, 1)
    ours = jax.grad(lambda v: jnp.sum(layers.max_pool2x(v) * weights))(x)
    theirs = jax.grad(lambda v: jnp.sum(nn.max_pool(v, (2, 2), strides=(2, 2)) * weights))(x)
    np.testing.assert_array_equal(layers.max_pool2x(x), nn.max_pool(x, (2, 2), strides=(2, 2)))
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
        np.testing.assert_array_equal(layers.guarded_max(x, axis), jnp.max(x, axis, keepdims=True))
        ours = jax.jit(jax.grad(lambda v: jnp.sum(layers.guarded_max(v, axis) * weights)))(x)
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


def _checkpoint_from(params: dict, grid_side: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Writes the checkpoint layout: no 'resnet/' prefix, (1, 1 + n, D) position table, extra heads."""
    rng = np.random.default_rng(seed)
    checkpoint = {}
    for path, leaf in traverse_util.flatten_dict(params, sep="/").items():
        if path.startswith("resnet/"):
            name = path[len("resnet/"):]
        elif path.startswith(("embedding/", "Transformer/")):
            name = path
        else:
            continue
        shape = leaf.shape
        if name.endswith("pos_embedding"):
            shape = (1, 1 + grid_side * grid_side, leaf.shape[-1])
        elif name.startswith("gn_root"):
            shape = (1, 1, 1, leaf.shape[0])  # some exports keep GroupNorm params 4-D
        checkpoint[name] = rng.normal(size=shape).astype(np.float32)
    checkpoint["cls"] = np.zeros((1, 1, 16), np.float32)
    checkpoint["head/kernel"] = np.zeros((16, 10), np.float32)
    return checkpoint


def test_load_pretrained_npz_round_trip(tmp_path):
    model = create_model("transunet", width=4, resnet_units=(1, 2, 1), **TINY_TRANSFORMER)
    images = jnp.ones((1, 32, 32, 3))
    params = random_params(model, images)["params"]
    checkpoint = _checkpoint_from(params, grid_side=4)
    path = tmp_path / "R50+ViT-B_16.npz"
    np.savez(path, **checkpoint)

    loaded = load_pretrained_npz(params, path)
    flat_loaded = traverse_util.flatten_dict(loaded, sep="/")
    np.testing.assert_array_equal(
        flat_loaded["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"],
        checkpoint["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"],
    )
    np.testing.assert_array_equal(flat_loaded["resnet/block2/unit1/conv2/kernel"], checkpoint["block2/unit1/conv2/kernel"])
    np.testing.assert_array_equal(flat_loaded["resnet/gn_root/scale"], checkpoint["gn_root/scale"].reshape(-1))
    # 4x4 grid + class token resized to the model's 2x2 grid (32 / 16).
    assert flat_loaded["Transformer/posembed_input/pos_embedding"].shape == (1, 2, 2, 16)
    np.testing.assert_array_equal(flat_loaded["conv_more/Conv_0/kernel"], params["conv_more"]["Conv_0"]["kernel"])
    assert jax.jit(model.apply)({"params": loaded}, images).shape == (1, 32, 32, 1)

    del checkpoint["block1/unit1/gn1/bias"]
    with pytest.raises(KeyError, match="block1/unit1/gn1/bias"):
        load_pretrained_npz(params, checkpoint)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_pretrained_npz(params, tmp_path / "missing.npz")
    checkpoint = _checkpoint_from(params, grid_side=2)
    checkpoint["embedding/kernel"] = np.zeros((1, 1, 8, 16), np.float32)
    with pytest.raises(ValueError, match="embedding/kernel"):
        load_pretrained_npz(params, checkpoint)


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
