"""One training step (forward + backward + Adam) of a U-Net and of IMSAHLO in JAX and in PyTorch, on CPU.

Compares, in one process and interleaved step by step (the CPU may be shared, so only ratios
measured side by side are meaningful, and only on an otherwise idle CPU: under load from other
processes PyTorch's OpenMP threads slowed 7x where XLA's pool slowed 1.5x, IMSAHLO at 128x192, so
the header prints the load average from before the run and the share of CPU time the hypervisor
took away during the steps):
  jax-lax      the benchmark U-Net with plain `lax.conv_general_dilated` (XLA's own gradients)
  jax-conv2d   the same U-Net with this codebase's layers: `ops.conv2d` (fast CPU kernel
               gradient), `layers.GroupNorm` and `layers.max_pool2x`
  torch        the equivalent PyTorch network (optional dependency: `pip install -e '.[bench]'`)
  unet, imsahlo          `neuroseg_jax.models.create_model(name)` as used by training (conv2d)
  unet-lax, imsahlo-lax  the same models built with conv='lax' (plain lax convolution)
  torch-imsahlo          the PyTorch twin of imsahlo (`torch_models.TorchIMSAHLO`)

Benchmark U-Net: 4 levels of [conv3x3 -> GroupNorm(8) -> ReLU] x 2 with 32, 64, 128, 256
channels, 2x2 max pooling, 2x2 stride-2 transposed-conv upsampling (in JAX a bias-free 1x1 conv
to 4C, depth-to-space and a C bias: the same map and parameters as ConvTranspose2d), skip
concatenation, 1x1 head, 1 input and 1 output channel (1,927,841 parameters, checked against the
PyTorch twin when it is built, like IMSAHLO's); loss: mean sigmoid binary cross-entropy.

IMSAHLO: the registry model (width 32, depth 4, MSDB blocks with SE, Swish, Hierarchical
Attention, GroupNorm(8), spatial dropout 0.1, bilinear upsampling, float32, 12.0M parameters) with
1 output channel and the same loss. Its twin is built from the Flax module's fields and must have
the same parameter count (checked when built); `--check` also copies the JAX parameters into it
and compares logits and gradients on a 1x64x96 image.

Prints s/step (median of --steps after --warmup untimed steps), GFLOP/s against XLA's FLOP count of
the plain-lax twin (jax-lax for jax-conv2d and torch, unet-lax for unet, imsahlo-lax for imsahlo
and torch-imsahlo; counted from the twin's lowering when it is not run, because XLA cannot count
the conv2d variants' compiled convolution kernels, FFI calls), the ratio to the PyTorch twin of
the same network (torch-imsahlo for the imsahlo rows, torch for jax-lax and jax-conv2d; the first
variant for unet and unet-lax, the wider registry U-Net that has no twin, and when the twin is not
run), the process's peak RSS while that variant ran (includes the other variants' resident state)
and the step's growth over it (with --host-memory reuse, memory freed by the variant before counts as
resident, so the growth shows only what a step needed beyond it).

Both frameworks share the process's malloc settings: by default the policy launch/*.py set
(`train.reuse_freed_host_memory`: freed memory kept for the next step, JAX's CPU steps run inline
so XLA's temporaries come from that memory); --host-memory default measures glibc's and JAX's
defaults, under which both frameworks fault in fresh pages for every large temporary.

Both frameworks get the same threads: XLA's CPU pool has one per CPU this process may use, torch
gets as many unless --threads says otherwise. The PyTorch twins keep PyTorch's default contiguous
(NCHW) layout: channels_last was no faster (idle CPU, 256x384, 5 interleaved steps: IMSAHLO 3.11
against 3.14 s, U-Net 1.18 against 1.12 s; at 512x768 within the noise); --torch-layout
channels_last re-measures.

  python benchmarks/train_step.py                      # 512x768, batch 2, 5 steps
  python benchmarks/train_step.py --size 128x192 --steps 3 --variants jax-lax,jax-conv2d
  python benchmarks/train_step.py --variants unet,torch,imsahlo,torch-imsahlo
  python benchmarks/train_step.py --check              # torch-imsahlo computes what imsahlo does
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from jax import lax

from neuroseg_jax.models import layers
from neuroseg_jax.ops import conv2d, reuse_freed_host_memory

LEVEL_CHANNELS = (32, 64, 128, 256)
NORM_GROUPS = 8
ALL_VARIANTS = (
    "jax-lax",
    "jax-conv2d",
    "torch",
    "unet",
    "unet-lax",
    "imsahlo",
    "imsahlo-lax",
    "torch-imsahlo",
)
# Whose XLA FLOP count a variant's GFLOP/s uses, best first: the plain-lax twin, because XLA cannot
# count conv2d's compiled convolution kernels (FFI calls); its lowering is counted when it did not run.
FLOP_SOURCES = {
    "jax-conv2d": ("jax-lax",),
    "torch": ("jax-lax", "jax-conv2d"),
    "unet": ("unet-lax",),
    "imsahlo": ("imsahlo-lax",),
    "torch-imsahlo": ("imsahlo-lax", "imsahlo"),
}

_SIZE = flags.DEFINE_string("size", "512x768", "HxW, multiples of 16")
_BATCH = flags.DEFINE_integer("batch", 2, "images per step")
_STEPS = flags.DEFINE_integer("steps", 5, "timed steps per variant (median)")
_WARMUP = flags.DEFINE_integer(
    "warmup", 2,
    "untimed steps per variant first: IMSAHLO's second step still ran 1.5-2x slower than the "
    "later ones (its temporaries' fresh pages)")
_THREADS = flags.DEFINE_integer(
    "threads", len(os.sched_getaffinity(0)),
    "torch threads (default: the CPUs this process may use, the size of XLA's CPU thread pool)")
_TORCH_LAYOUT = flags.DEFINE_enum(
    "torch-layout", "contiguous", ["channels_last", "contiguous"],
    "memory format of the PyTorch twins (channels_last measured no faster, see above)")
_HOST_MEMORY = flags.DEFINE_enum(
    "host-memory", "reuse", ["reuse", "default"],
    "reuse: freed memory stays in the process for the next step, as launch/*.py set it "
    "(train.reuse_freed_host_memory: glibc settings shared by both frameworks, JAX's CPU steps run "
    "inline); default: glibc's defaults, under which every step's large temporaries are fresh pages")
_VARIANTS = flags.DEFINE_string("variants", "jax-lax,jax-conv2d,torch", f"comma list of {ALL_VARIANTS}")
_CHECK = flags.DEFINE_bool("check", False, "only check torch-imsahlo against JAX imsahlo")


def lax_conv2d(
    inputs, kernel, *, strides=(1, 1), padding="SAME", dilation=(1, 1), groups=1
):
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
        return (
            self.conv_fn(
                x, kernel, strides=(1, 1), padding="SAME", dilation=(1, 1), groups=1
            )
            + bias
        )


class BenchUpConv(nn.Module):
    """2x2 stride-2 transposed convolution (PyTorch's ConvTranspose2d(k=2, s=2)): a bias-free 1x1
    convolution to 4 x `features` through `conv_fn`, depth-to-space, then one bias per output
    channel. (B, H, W, Cin) -> (B, 2H, 2W, features)."""

    features: int
    conv_fn: Callable[..., jax.Array]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (1, 1, x.shape[-1], 4 * self.features)
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        x = self.conv_fn(x, kernel, strides=(1, 1), padding="SAME", dilation=(1, 1), groups=1)
        batch, height, width, _ = x.shape
        x = x.reshape(batch, height, width, 2, 2, self.features)
        x = x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, 2 * height, 2 * width, self.features)
        return x + bias


class BenchUNet(nn.Module):
    """(B, H, W, 1) -> logits (B, H, W, 1); H, W divisible by 8.

    `codebase_layers` swaps flax's GroupNorm and max pooling for `neuroseg_jax.models.layers`'
    (same values and parameter names, faster gradients on CPU)."""

    conv_fn: Callable[..., jax.Array]
    codebase_layers: bool = False

    def block(self, x: jax.Array, channels: int) -> jax.Array:
        norm = layers.GroupNorm if self.codebase_layers else nn.GroupNorm
        for _ in range(2):
            x = BenchConv(channels, 3, self.conv_fn)(x)
            x = nn.relu(norm(num_groups=NORM_GROUPS, epsilon=1e-5)(x))
        return x

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        skips = []
        for channels in LEVEL_CHANNELS[:-1]:
            x = self.block(x, channels)
            skips.append(x)
            x = layers.max_pool2x(x) if self.codebase_layers else nn.max_pool(x, (2, 2), strides=(2, 2))
        x = self.block(x, LEVEL_CHANNELS[-1])
        for channels, skip in zip(reversed(LEVEL_CHANNELS[:-1]), reversed(skips)):
            x = BenchUpConv(channels, self.conv_fn)(x)
            x = self.block(jnp.concatenate([x, skip], axis=-1), channels)
        return BenchConv(1, 1, self.conv_fn)(x)


def cpu_jiffies() -> list[int]:
    """This machine's CPU time counters from /proc/stat (user, nice, system, idle, iowait, irq,
    softirq, steal, ...); steal is time the hypervisor gave this VM's CPUs to someone else."""
    with open("/proc/stat") as handle:
        return [int(value) for value in handle.readline().split()[1:9]]


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


def parameter_count(params: Any) -> int:
    return sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))


def jax_step(model: nn.Module, images: np.ndarray, labels: np.ndarray, apply_kwargs: dict):
    """(jitted Adam step of `model`, its arguments (params, opt_state, images, labels), parameter count)."""
    tx = optax.adam(1e-3)
    variables = model.init(
        jax.random.PRNGKey(0), jnp.asarray(images[:1]), **apply_kwargs
    )
    params = variables["params"]
    opt_state = tx.init(params)

    def loss_fn(params, images, labels):
        logits = model.apply(
            {"params": params},
            images,
            rngs={"dropout": jax.random.PRNGKey(1)},
            **apply_kwargs,
        )
        return optax.sigmoid_binary_cross_entropy(logits[..., 0], labels).mean()

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, images, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, images, labels)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    arguments = (params, opt_state, jnp.asarray(images), jnp.asarray(labels))
    return step, arguments, parameter_count(params)


def xla_flops(cost: Any) -> float:
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def jax_step_runner(
    model: nn.Module, images: np.ndarray, labels: np.ndarray, apply_kwargs: dict
):
    """Returns (run_one_step, xla_flops, n_params) for a jitted Adam step of `model`."""
    step, (params, opt_state, images, labels), n_params = jax_step(model, images, labels, apply_kwargs)
    compiled = step.lower(params, opt_state, images, labels).compile()
    state = {"params": params, "opt_state": opt_state}

    def run() -> None:
        state["params"], state["opt_state"], loss = compiled(
            state["params"], state["opt_state"], images, labels
        )
        loss.block_until_ready()

    return run, xla_flops(compiled.cost_analysis()), n_params


def registry_model(name: str, conv: str = "auto") -> nn.Module:
    """`create_model(name)` as the benchmark configures it: one output channel, float32, the
    convolution implementation `conv`."""
    from neuroseg_jax.models import create_model

    return create_model(name, num_classes=1, conv=conv)


def build_torch_twin(name: str, in_channels: int) -> Any:
    """The PyTorch network of variant `name`; ImportError without torch."""
    import torch_models

    if name == "torch":
        return torch_models.TorchUNet(LEVEL_CHANNELS, NORM_GROUPS)
    return torch_models.TorchIMSAHLO(registry_model("imsahlo"), in_channels)


def torch_step_runner(
    model: Any, images: np.ndarray, labels: np.ndarray, channels_last: bool
):
    """Returns (run_one_step, n_params) for an eager Adam step of `model` (NCHW)."""
    import torch

    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = (
        torch.from_numpy(images)
        .permute(0, 3, 1, 2)
        .contiguous(memory_format=memory_format)
    )
    y = torch.from_numpy(labels)

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x)[:, 0], y)
        loss.backward()
        optimizer.step()

    return run, sum(p.numel() for p in model.parameters())


def build_variant(
    name: str, images: np.ndarray, labels: np.ndarray, *, torch_threads: int, channels_last: bool
):
    """Returns (run, flops or None, n_params) for variant `name`."""
    if name.startswith("torch"):
        import torch

        torch.set_num_threads(torch_threads)
        twin = build_torch_twin(name, images.shape[-1])
        run, n_params = torch_step_runner(twin, images, labels, channels_last)
        jax_twin = BenchUNet(lax_conv2d) if name == "torch" else registry_model("imsahlo")
        shapes = jax.eval_shape(jax_twin.init, jax.random.PRNGKey(0), images[:1])
        jax_params = parameter_count(shapes["params"])
        if n_params != jax_params:
            raise RuntimeError(f"{name} has {n_params} parameters, its JAX twin {jax_params}")
        return run, None, n_params
    return with_jax_variant(name, lambda model, kwargs: jax_step_runner(model, images, labels, kwargs))


def with_jax_variant(name: str, use: Callable[[nn.Module, dict], Any]) -> Any:
    """use(model, apply_kwargs) for JAX variant `name`, the model built with the variant's convolution."""
    if name == "jax-lax":
        return use(BenchUNet(lax_conv2d), {})
    if name == "jax-conv2d":
        return use(BenchUNet(conv2d, codebase_layers=True), {})
    model_name, _, baseline = name.partition("-")
    return use(registry_model(model_name, conv="lax" if baseline else "auto"), {"train": True})


def lowered_flops(name: str, images: np.ndarray, labels: np.ndarray) -> float:
    """XLA's FLOP count of JAX variant `name`'s compiled step (compiled, not run)."""

    def count(model, kwargs):
        step, arguments, _ = jax_step(model, images, labels, kwargs)
        return xla_flops(step.lower(*arguments).compile().cost_analysis())

    return with_jax_variant(name, count)


def check_imsahlo_twin(height: int = 64, width: int = 96) -> None:
    """Copies JAX IMSAHLO parameters into torch-imsahlo; compares parameter counts, logits and the
    loss gradients of every parameter (inference mode: no dropout). Exits 1 on a mismatch."""
    import torch
    import torch_models
    from flax.traverse_util import flatten_dict, unflatten_dict

    model = registry_model("imsahlo")
    rng = np.random.default_rng(0)
    images = rng.random((1, height, width, 1), dtype=np.float32)
    labels = (rng.random((1, height, width)) > 0.7).astype(np.float32)
    initial = flatten_dict(
        model.init(jax.random.PRNGKey(0), jnp.asarray(images))["params"]
    )
    # Perturbed so that GroupNorm scales (initially 1) and biases (initially 0) differ from each
    # other; flatten/unflatten keep the creation order that load_flax_params pairs by.
    params = unflatten_dict(
        {
            path: value + 0.1 * rng.standard_normal(value.shape, dtype=np.float32)
            for path, value in initial.items()
        }
    )
    twin = torch_models.TorchIMSAHLO(model, images.shape[-1]).eval()
    torch_models.load_flax_params(twin, params)
    jax_count = parameter_count(params)
    torch_count = sum(p.numel() for p in twin.parameters())

    def jax_loss(params):
        logits = model.apply({"params": params}, images)
        return optax.sigmoid_binary_cross_entropy(logits[..., 0], labels).mean(), logits

    (_, logits), grads = jax.value_and_grad(jax_loss, has_aux=True)(params)
    torch_logits = twin(torch.from_numpy(images).permute(0, 3, 1, 2))
    torch.nn.functional.binary_cross_entropy_with_logits(
        torch_logits[:, 0], torch.from_numpy(labels)
    ).backward()
    logit_difference = float(
        np.abs(
            np.asarray(logits) - torch_logits.detach().permute(0, 2, 3, 1).numpy()
        ).max()
    )
    # jax.grad returns the keys sorted; paired_parameters needs the creation order back.
    flat_grads = flatten_dict(grads)
    ordered_grads = unflatten_dict({path: flat_grads[path] for path in initial})
    gradient_difference = max(
        float(np.abs(jax_grad - param.grad.numpy()).max() / np.abs(jax_grad).max())
        for _, jax_grad, param in torch_models.paired_parameters(twin, ordered_grads)
    )
    print(
        f"imsahlo 1x{height}x{width}: parameters JAX {jax_count}, PyTorch {torch_count}; "
        f"max |logit difference| {logit_difference:.2e} (logits up to {float(np.abs(logits).max()):.2f}); "
        f"max gradient difference relative to the parameter's largest gradient {gradient_difference:.2e}"
    )
    if (
        jax_count != torch_count
        or logit_difference > 1e-4
        or gradient_difference > 1e-3
    ):
        raise SystemExit("torch-imsahlo does not match JAX imsahlo")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # absl's INFO default would mix libraries' notes into the table
    if _HOST_MEMORY.value == "reuse":
        reuse_freed_host_memory()  # before JAX's first computation
    if _CHECK.value:
        check_imsahlo_twin()
        return
    load_before = os.getloadavg()[0]
    batch, steps, warmup = _BATCH.value, _STEPS.value, _WARMUP.value
    height, width = (int(v) for v in _SIZE.value.lower().split("x"))
    names = [n for n in _VARIANTS.value.split(",") if n]
    unknown = sorted(set(names) - set(ALL_VARIANTS))
    if unknown:
        raise ValueError(f"unknown --variants {unknown}; known: {ALL_VARIANTS}")

    rng = np.random.default_rng(0)
    images = rng.random((batch, height, width, 1), dtype=np.float32)
    labels = (rng.random((batch, height, width)) > 0.7).astype(np.float32)

    runners, flops, params = {}, {}, {}
    for name in names:
        try:
            runners[name], flops[name], params[name] = build_variant(
                name, images, labels, torch_threads=_THREADS.value,
                channels_last=_TORCH_LAYOUT.value == "channels_last"
            )
        except ImportError as error:
            print(f"skipping {name}: {error}")
        else:
            print(f"built {name}: {params[name]} parameters", flush=True)
    peak = PeakRss()
    times: dict[str, list[float]] = {name: [] for name in runners}
    peaks: dict[str, float] = {name: 0.0 for name in runners}
    step_growth: dict[str, float] = {name: 0.0 for name in runners}
    jiffies_before = cpu_jiffies()
    for round_index in range(warmup + steps):
        for name, run in runners.items():
            peak.reset()
            resident_before = peak.read_mib("VmRSS")
            start = time.perf_counter()
            run()
            elapsed = time.perf_counter() - start
            peaks[name] = max(peaks[name], peak.read_mib())
            step_growth[name] = max(step_growth[name], peaks[name] - resident_before)
            if round_index >= warmup:
                times[name].append(elapsed)
            print(f"round {round_index} {name}: {elapsed:.3f} s", flush=True)

    def reference_flops(name: str) -> float:
        """The plain-lax twin's count: from its compiled step where it ran, else from its lowering."""
        sources = FLOP_SOURCES.get(name, ())
        for source in sources:
            if flops.get(source):
                return flops[source]
        if sources and sources[0] not in flops:
            flops[sources[0]] = lowered_flops(sources[0], images, labels)
            return flops[sources[0]]
        return flops.get(name) or float("nan")

    jiffies = [after - before for after, before in zip(cpu_jiffies(), jiffies_before)]
    medians = {name: statistics.median(samples) for name, samples in times.items()}

    def ratio_reference(name: str) -> str:
        """The PyTorch twin of the same network, or the first variant when there is none (the
        registry `unet` is wider than the benchmark U-Net that `torch` mirrors) or it did not run."""
        twin = {"jax-lax": "torch", "jax-conv2d": "torch", "torch": "torch"}
        twin |= {"imsahlo": "torch-imsahlo", "imsahlo-lax": "torch-imsahlo", "torch-imsahlo": "torch-imsahlo"}
        return twin[name] if twin.get(name) in medians else next(iter(medians))

    print(
        f"\ntrain step {batch}x{height}x{width}, median of {steps} steps after {warmup} untimed; "
        f"1-minute load average before the run: {load_before:.1f}, CPU time stolen by the "
        f"hypervisor during the steps: {100 * jiffies[7] / sum(jiffies):.0f}%; "
        f"XLA threads: {len(os.sched_getaffinity(0))}, torch threads: {_THREADS.value} ({_TORCH_LAYOUT.value}); "
        f"host memory: {_HOST_MEMORY.value}; "
        f"RSS: process peak {'during the variant' if peak.resettable else 'over the run'}, "
        f"and its growth over the resident size before the step (the step's temporaries)"
    )
    print(
        f"{'variant':13s} {'params':>9s} {'s/step':>8s} {'GFLOP':>8s} {'GFLOP/s':>8s} {'ratio':>6s} {'to':13s} "
        f"{'RSS MiB':>8s} {'+step':>7s}"
    )
    for name, median in medians.items():
        work = reference_flops(name)
        reference = ratio_reference(name)
        print(
            f"{name:13s} {params[name]:9d} {median:8.3f} {work / 1e9:8.1f} {work / median / 1e9:8.1f} "
            f"{median / medians[reference]:6.2f} {reference:13s} {peaks[name]:8.0f} {step_growth[name]:7.0f}"
        )


if __name__ == "__main__":
    app.run(main)
