"""The custom gradients (max pool, guarded max, GroupNorm, conv2d, soft skeleton) at XLA's default
CPU optimisation level. The rest of the suite compiles at level 0 (conftest.py sets XLA_FLAGS for
this process and its subprocesses), which fuses differently; the checks run in one subprocess whose
XLA_FLAGS have that option removed (tests/default_optimization_checks.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("default_optimization_checks.py")
CHECKS = [
    "max_pool2x", "max_pool2x with ties", "guarded_max over (1, 2)", "guarded_max over -1", "GroupNorm + Swish",
    "conv2d 3x3 stride 1 (Winograd)", "conv2d 3x3 stride 1 dilation 2 (Winograd)", "conv2d 7x7 2->1 (thin)",
    "conv2d 3x3 stride 2", "soft_skeleton",
]


def default_level_environment() -> dict[str, str]:
    """This process's environment with every --xla_backend_optimization_level option dropped from
    XLA_FLAGS, on the CPU, where the compiled convolution handlers run."""
    flags = [
        flag for flag in os.environ.get("XLA_FLAGS", "").split()
        if not flag.startswith("--xla_backend_optimization_level")
    ]
    return {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}


def test_custom_gradients_match_references_at_the_default_optimisation_level():
    env = default_level_environment()
    assert "xla_backend_optimization_level" not in env["XLA_FLAGS"]
    result = subprocess.run(
        [sys.executable, str(SCRIPT)], env=env, cwd=SCRIPT.parent, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    lines = result.stdout.splitlines()
    assert [line for line in lines if line.endswith(": ok")] == [f"{name}: ok" for name in CHECKS], result.stdout
