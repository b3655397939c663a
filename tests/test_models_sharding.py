"""Sharded TransUNet forward on 8 fake CPU devices equals the single-device result.

Runs in a subprocess because the fake device count must be set before JAX starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from neuroseg_jax.models import create_model, partition_specs, sharding_rules

    assert jax.device_count() == 8, jax.devices()
    model = create_model("transunet", width=4, resnet_units=(1, 1, 1), hidden_size=16, num_layers=1,
                         num_heads=2, mlp_dim=32, img_size=32)
    images = jax.random.uniform(jax.random.key(0), (8, 32, 32, 1))
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: jnp.asarray(0.1 * rng.normal(size=s.shape), s.dtype), shapes)
    expected = jax.jit(model.apply)(variables, images)

    for axes, fsdp in (((8, 1), "data"), ((4, 2), None)):
        mesh = Mesh(np.array(jax.devices()).reshape(axes), ("data", "model"))
        specs = partition_specs(variables, sharding_rules("transunet"), axis_sizes=dict(mesh.shape),
                                fsdp_axis=fsdp, fsdp_min_size=256)
        sharded = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), variables, specs)
        batch = jax.device_put(images, NamedSharding(mesh, PartitionSpec("data")))
        block = sharded["params"]["Transformer"]["encoderblock_0"]
        if axes[1] == 2:
            assert block["MlpBlock_3"]["Dense_0"]["kernel"].sharding.spec == PartitionSpec(None, "model")
        got = jax.jit(model.apply)(sharded, batch)
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-4, atol=1e-4)
        print("ok", axes)
    """
)


@pytest.mark.slow
def test_sharded_forward_matches_single_device():
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok") == 2
