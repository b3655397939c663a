"""Where one training step's time goes on this machine: XLA's executed ops grouped by kind.

Runs forward + backward of a registry model (sigmoid BCE, one output channel) once to compile, once
timed, and once under `jax.profiler`; then sums the profiled duration of every executed HLO op
(fusions included) by the kind of work inside it: convolution, dot, reduce, gather/scatter,
copy/transpose/concat, elementwise. Lists the slowest convolutions and other ops with their output
shape and the model layer they come from (the kernel gradients of `ops/conv.py`'s custom VJP
carry no layer name), so speed work can start from the biggest cost rather than a guess.

    python benchmarks/profile_step.py --model imsahlo --size 256x384
    python benchmarks/profile_step.py --model unet --size 512x768 --top 20
"""

from __future__ import annotations

import collections
import pathlib
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging

from neuroseg_jax.models import create_model
from neuroseg_jax.ops import reuse_freed_host_memory

_MODEL = flags.DEFINE_string("model", "imsahlo", "registry model name")
_WIDTH = flags.DEFINE_integer("width", 32, "model base width")
_SIZE = flags.DEFINE_string("size", "256x384", "HxW")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 2, "images per step")
_TOP = flags.DEFINE_integer("top", 12, "slowest ops listed per group")

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\((.*)$", re.M)
_COMPUTATION = re.compile(r"^%?([\w.\-]+) .*?\{\n(.*?)\n\}", re.M | re.S)
_OPCODE = re.compile(r"= \S+ ([\w\-]+)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def hlo_index(hlo_text: str) -> tuple[dict, dict]:
    """instruction name -> (opcode, output shape, called computation or None, HLO line);
    computation name -> body."""
    instructions = {}
    for match in _INSTRUCTION.finditer(hlo_text):
        name, shape, opcode, rest = match.groups()
        called = re.search(r"calls=%?([\w.\-]+)", rest)
        instructions[name] = (opcode, shape.split("{")[0], called.group(1) if called else None, match.group(0).strip())
    return instructions, {m.group(1): m.group(2) for m in _COMPUTATION.finditer(hlo_text)}


def op_kind(opcode: str, body: str, line: str) -> str:
    """The kind of work of one executed op (its opcode and, for fusions, the opcodes inside; on GPUs
    convolutions and matrix products are library calls named in the HLO line)."""
    inner = set(_OPCODE.findall(body)) | {opcode}
    if "convolution" in inner or "cudnn$conv" in line:
        return "convolution"
    if "dot" in inner or "gemm" in line.lower():
        return "dot"
    if "reduce" in inner or "reduce-window" in inner:
        return "reduce"
    if {"gather", "scatter", "select-and-scatter"} & inner:
        return "gather/scatter"
    if inner <= {"parameter", "copy", "transpose", "bitcast", "fusion", "concatenate", "slice", "pad"}:
        return "copy/transpose/concat"
    return "elementwise"


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # absl's INFO default would mix libraries' notes into the table
    reuse_freed_host_memory()  # as launch/train.py does, so page faults do not inflate the op times
    batch_size = _BATCH_SIZE.value
    height, width = (int(v) for v in _SIZE.value.split("x"))
    model = create_model(_MODEL.value, num_classes=1, width=_WIDTH.value)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.random((batch_size, height, width, 1), dtype=np.float32))
    labels = jnp.asarray((rng.random((batch_size, height, width, 1)) > 0.5).astype(np.float32))
    params = model.init(jax.random.key(0), images[:1])["params"]

    def loss(params):
        logits = model.apply({"params": params}, images, train=True, rngs={"dropout": jax.random.key(1)})
        return optax.sigmoid_binary_cross_entropy(logits, labels).mean()

    step = jax.jit(jax.value_and_grad(loss))
    jax.block_until_ready(step(params))
    start = time.perf_counter()
    jax.block_until_ready(step(params))
    seconds = time.perf_counter() - start
    instructions, computations = hlo_index(step.lower(params).compile().as_text())
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        jax.block_until_ready(step(params))
        jax.profiler.stop_trace()
        trace = jax.profiler.ProfileData.from_file(str(next(pathlib.Path(trace_dir).rglob("*.xplane.pb"))))
    durations = collections.Counter()
    for plane in trace.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in instructions:
                    durations[event.name] += event.duration_ns / 1e6
    if sum(durations.values()) < 0.1 * seconds * 1e3:
        raise SystemExit(f"the {jax.devices()[0].platform} trace's events named after the compiled step's HLO "
                         "instructions cover under 10% of the step (GPU traces name kernels; this tool reads CPU traces)")
    by_kind = collections.Counter()
    listed = collections.defaultdict(list)
    for name, milliseconds in durations.items():
        opcode, shape, called, line = instructions[name]
        kind = op_kind(opcode, computations.get(called, ""), line)
        by_kind[kind] += milliseconds
        origins = _OP_NAME.findall(line + computations.get(called, ""))
        listed["convolution" if kind == "convolution" else "other"].append(
            (milliseconds, shape, kind, origins[-1] if origins else "")
        )
    total = sum(by_kind.values())
    print(f"{_MODEL.value} width {_WIDTH.value}, {batch_size}x{height}x{width}: step {seconds:.2f} s wall, "
          f"{total / 1e3:.2f} s of op time summed over XLA's threads")
    for kind, milliseconds in by_kind.most_common():
        print(f"  {kind:24s} {milliseconds:9.1f} ms {100 * milliseconds / total:5.1f}%")
    for group in ("convolution", "other"):
        print(f"slowest {group} ops:")
        for milliseconds, shape, kind, origin in sorted(listed[group], reverse=True)[: _TOP.value]:
            print(f"  {milliseconds:8.1f} ms  {kind:22s} {shape:24s} {origin[-90:]}")


if __name__ == "__main__":
    app.run(main)
