"""One training step (forward + backward + Adam) of a U-Net in JAX and in PyTorch, on CPU.

Compares, in one process and interleaved step by step (the CPU may be shared, so only ratios
measured side by side are meaningful):
  jax-lax      the benchmark U-Net with plain `lax.conv_general_dilated` (XLA's own gradients)
  jax-conv2d   the same U-Net with `neuroseg_jax.models.conv.conv2d` (fast CPU kernel gradient)
  torch        the equivalent PyTorch network (optional dependency: `pip install torch==2.13.0`)
  unet, imsahlo          `neuroseg_jax.models.create_model(name)` as used by training (conv2d)
  unet-lax, imsahlo-lax  the same models with `layers.conv2d` swapped for plain lax convolution

Benchmark U-Net: 4 levels of [conv3x3 -> GroupNorm(8) -> ReLU] x 2 with 32, 64, 128, 256
channels, 2x2 max pooling, 2x2 stride-2 transposed-conv upsampling (in JAX a 1x1 conv to 4C
followed by depth-to-space, the same linear map), skip concatenation, 1x1 head, 1 input and
1 output channel (~1.9M parameters); loss: mean sigmoid binary cross-entropy.

Prints s/step (median of --steps after one warm-up step), GFLOP/s against XLA's FLOP count of
the plain-lax twin (jax-lax for jax-conv2d and torch, unet-lax for unet, imsahlo-lax for imsahlo,
when built; XLA counts the custom kernel gradient differently),
the ratio to torch (or to the first variant when torch is absent), the process's peak RSS while
that variant ran (includes the other variants' resident state) and the step's growth over it.

  python benchmarks/train_step.py                      # 512x768, batch 2, 5 steps
  python benchmarks/train_step.py --size 128x192 --steps 3 --variants jax-lax,jax-conv2d
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from functools import partial
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from neuroseg_jax.models import conv as conv_module

LEVEL_CHANNELS = (32, 64, 128, 256)
NORM_GROUPS = 8
ALL_VARIANTS = ("jax-lax", "jax-conv2d", "torch", "unet", "unet-lax", "imsahlo", "imsahlo-lax")


def lax_conv2d(inputs, kernel, *, strides=(1, 1), padding="SAME", dilation=(1, 1), groups=1):
    """Plain XLA convolution with conv2d's signature: the baseline whose gradients XLA derives."""
    return lax.conv_general_dilated(
        inputs,
        kernel,
        window_strides=tuple(strides),
        padding=padding if isinstance(padding, str) else tuple(map(tuple, padding)),
        rhs_dilation=tuple(dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )


class BenchConv(nn.Module):
    """Square 'SAME' convolution with bias through `conv_fn` (conv2d's signature)."""

    features: int
    kernel_size: int
    conv_fn: Callable[..., jax.Array]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (self.kernel_size, self.kernel_size, x.shape[-1], self.features),
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        return self.conv_fn(x, kernel, strides=(1, 1), padding="SAME", dilation=(1, 1), groups=1) + bias


class BenchUNet(nn.Module):
    """(B, H, W, 1) -> logits (B, H, W, 1); H, W divisible by 8."""

    conv_fn: Callable[..., jax.Array]

    def block(self, x: jax.Array, channels: int) -> jax.Array:
        for _ in range(2):
            x = BenchConv(channels, 3, self.conv_fn)(x)
            x = nn.relu(nn.GroupNorm(num_groups=NORM_GROUPS, epsilon=1e-5)(x))
        return x

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        skips = []
        for channels in LEVEL_CHANNELS[:-1]:
            x = self.block(x, channels)
            skips.append(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = self.block(x, LEVEL_CHANNELS[-1])
        for channels, skip in zip(reversed(LEVEL_CHANNELS[:-1]), reversed(skips)):
            x = BenchConv(4 * channels, 1, self.conv_fn)(x)
            batch, height, width, _ = x.shape
            x = x.reshape(batch, height, width, 2, 2, channels)
            x = x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, 2 * height, 2 * width, channels)
            x = self.block(jnp.concatenate([x, skip], axis=-1), channels)
        return BenchConv(1, 1, self.conv_fn)(x)


def build_torch_unet(torch: Any) -> Any:
    """The PyTorch twin of BenchUNet (NCHW), ConvTranspose2d(k=2, s=2) for upsampling."""
    nn_t = torch.nn

    def block(cin: int, cout: int) -> Any:
        return nn_t.Sequential(
            nn_t.Conv2d(cin, cout, 3, padding=1), nn_t.GroupNorm(NORM_GROUPS, cout), nn_t.ReLU(inplace=True),
            nn_t.Conv2d(cout, cout, 3, padding=1), nn_t.GroupNorm(NORM_GROUPS, cout), nn_t.ReLU(inplace=True),
        )

    class TorchUNet(nn_t.Module):
        def __init__(self) -> None:
            super().__init__()
            channels = LEVEL_CHANNELS
            self.down = nn_t.ModuleList(
                [block(cin, cout) for cin, cout in zip((1,) + channels[:-2], channels[:-1])]
            )
            self.bottom = block(channels[-2], channels[-1])
            self.up = nn_t.ModuleList(
                [nn_t.ConvTranspose2d(cin, cout, 2, stride=2) for cin, cout in zip(channels[:0:-1], channels[-2::-1])]
            )
            self.up_blocks = nn_t.ModuleList([block(2 * cout, cout) for cout in channels[-2::-1]])
            self.head = nn_t.Conv2d(channels[0], 1, 1)

        def forward(self, x: Any) -> Any:
            skips = []
            for down in self.down:
                x = down(x)
                skips.append(x)
                x = torch.nn.functional.max_pool2d(x, 2)
            x = self.bottom(x)
            for up, up_block, skip in zip(self.up, self.up_blocks, reversed(skips)):
                x = up_block(torch.cat([up(x), skip], dim=1))
            return self.head(x)

    return TorchUNet()


class PeakRss:
    """Peak resident set size of this process since `reset()` (Linux VmHWM, reset via clear_refs)."""

    def __init__(self) -> None:
        self.resettable = True

    def reset(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:
            self.resettable = False

    def read_mib(self, field: str = "VmHWM") -> float:
        """VmHWM (peak) or VmRSS (current) in MiB; the process-lifetime peak if /proc is unreadable."""
        try:
            with open("/proc/self/status") as handle:
                for line in handle:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def jax_step_runner(model: nn.Module, images: np.ndarray, labels: np.ndarray, apply_kwargs: dict):
    """Returns (run_one_step, xla_flops, n_params) for a jitted Adam step of `model`."""
    tx = optax.adam(1e-3)
    variables = model.init(jax.random.PRNGKey(0), jnp.asarray(images[:1]), **apply_kwargs)
    params = variables["params"]
    opt_state = tx.init(params)

    def loss_fn(params, images, labels):
        logits = model.apply({"params": params}, images, rngs={"dropout": jax.random.PRNGKey(1)}, **apply_kwargs)
        return optax.sigmoid_binary_cross_entropy(logits[..., 0], labels).mean()

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, images, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    images, labels = jnp.asarray(images), jnp.asarray(labels)
    compiled = step.lower(params, opt_state, images, labels).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    state = {"params": params, "opt_state": opt_state}

    def run() -> None:
        state["params"], state["opt_state"], loss = compiled(state["params"], state["opt_state"], images, labels)
        loss.block_until_ready()

    n_params = sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))
    return run, float(cost.get("flops", float("nan"))), n_params


def torch_step_runner(torch: Any, images: np.ndarray, labels: np.ndarray):
    model = build_torch_unet(torch)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    y = torch.from_numpy(labels)

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x)[:, 0], y)
        loss.backward()
        optimizer.step()

    return run, sum(p.numel() for p in model.parameters())


def build_variant(name: str, images: np.ndarray, labels: np.ndarray, args: argparse.Namespace):
    """Returns (run, flops or None, n_params) for variant `name`."""
    if name == "torch":
        import torch

        torch.set_num_threads(args.threads)
        run, n_params = torch_step_runner(torch, images, labels)
        return run, None, n_params
    if name in ("jax-lax", "jax-conv2d"):
        conv_fn = lax_conv2d if name == "jax-lax" else conv_module.conv2d
        return jax_step_runner(BenchUNet(conv_fn), images, labels, {})
    from neuroseg_jax.models import create_model, layers

    model_name, _, baseline = name.partition("-")
    model = create_model(model_name, num_classes=1)
    original = layers.conv2d
    layers.conv2d = lax_conv2d if baseline else conv_module.conv2d
    try:  # the conv function is looked up when the step is traced, i.e. inside jax_step_runner
        return jax_step_runner(model, images, labels, {"train": True})
    finally:
        layers.conv2d = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="512x768", help="HxW, multiples of 16")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (XLA uses all cores)")
    parser.add_argument("--variants", default="jax-lax,jax-conv2d,torch", help=f"comma list of {ALL_VARIANTS}")
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.lower().split("x"))
    names = [n for n in args.variants.split(",") if n]
    unknown = sorted(set(names) - set(ALL_VARIANTS))
    if unknown:
        raise ValueError(f"unknown --variants {unknown}; known: {ALL_VARIANTS}")

    rng = np.random.default_rng(0)
    images = rng.random((args.batch, height, width, 1), dtype=np.float32)
    labels = (rng.random((args.batch, height, width)) > 0.7).astype(np.float32)

    runners, flops, params = {}, {}, {}
    for name in names:
        try:
            runners[name], flops[name], params[name] = build_variant(name, images, labels, args)
        except ImportError as error:
            print(f"skipping {name}: {error}")
        else:
            print(f"built {name}: {params[name]} parameters", flush=True)
    peak = PeakRss()
    times: dict[str, list[float]] = {name: [] for name in runners}
    peaks: dict[str, float] = {name: 0.0 for name in runners}
    step_growth: dict[str, float] = {name: 0.0 for name in runners}
    for round_index in range(args.steps + 1):  # round 0 is the warm-up
        for name, run in runners.items():
            peak.reset()
            resident_before = peak.read_mib("VmRSS")
            start = time.perf_counter()
            run()
            elapsed = time.perf_counter() - start
            peaks[name] = max(peaks[name], peak.read_mib())
            step_growth[name] = max(step_growth[name], peaks[name] - resident_before)
            if round_index:
                times[name].append(elapsed)
            print(f"round {round_index} {name}: {elapsed:.3f} s", flush=True)

    def reference_flops(name: str) -> float:
        """XLA's count for the plain-lax twin: the custom kernel gradient is counted differently."""
        twin = {"jax-conv2d": "jax-lax", "torch": "jax-lax", "unet": "unet-lax", "imsahlo": "imsahlo-lax"}.get(name, name)
        return flops.get(twin) or flops.get(name) or float("nan")

    medians = {name: statistics.median(samples) for name, samples in times.items()}
    baseline = "torch" if "torch" in medians else next(iter(medians))
    print(
        f"\ntrain step {args.batch}x{height}x{width}, {args.steps} steps, median; "
        f"CPU threads: {os.cpu_count()}, torch threads: {args.threads}; "
        f"RSS: process peak {'during the variant' if peak.resettable else 'over the run'}, "
        f"and its growth over the resident size before the step (the step's temporaries)"
    )
    print(
        f"{'variant':13s} {'params':>9s} {'s/step':>8s} {'GFLOP':>8s} {'GFLOP/s':>8s} {'/' + baseline:>10s} "
        f"{'RSS MiB':>8s} {'+step':>7s}"
    )
    for name, median in medians.items():
        work = reference_flops(name)
        print(
            f"{name:13s} {params[name]:9d} {median:8.3f} {work / 1e9:8.1f} {work / median / 1e9:8.1f} "
            f"{median / medians[baseline]:10.2f} {peaks[name]:8.0f} {step_growth[name]:7.0f}"
        )


if __name__ == "__main__":
    main()
