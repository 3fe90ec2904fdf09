"""fp8_deepseek vs bf16 training of the toy model: same data, seed and schedule.

Target (DeepSeek-V3 report): final loss within 0.25% relative of the bf16 run.  A toy run does
not resolve that figure: runs in different precisions drift apart by more than 0.25% from
rounding alone.  Measured (configs/train/toy.yaml with bias_update_speed 1e-2; mean loss of the
last 20 steps, relative to bf16):
    this CPU, 120 steps, seq 64 x batch 8 (this test):  fp8_deepseek -0.71%
    H100, 300 steps, seq 128 x batch 16, seeds 0 / 1:   fp32 +0.37% / -0.50%,
                                                        fp8_deepseek +0.27% / -0.07%,
                                                        fp8 routed experts too +0.25% / -1.27%
So this test asserts the bound GUARD, which catches a broken recipe (wrong gradients or lost
scales move the loss by far more), and prints the measured gap.  Resolving 0.25% takes an
average over several seeds (two seeds of 300 steps: fp8_deepseek +0.10%, fp32 -0.07%) or a
larger model trained longer:  python -m tests.precision.fp8_vs_bf16 --help
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .fp8_vs_bf16 import final_loss

REPO = Path(__file__).resolve().parents[2]
STEPS = 120
TARGET = 0.0025  # the report's figure, not resolved by a toy run (above)
GUARD = 0.03  # toy-run drift seen up to 1.27% (above)


@pytest.mark.slow
def test_fp8_deepseek_trains_like_bf16(tmp_path):
    # one CPU device and XLA's default optimisation: compile costs more, but steps run 2-6x faster
    env = dict(
        os.environ,
        XLA_FLAGS="",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    )
    out = tmp_path / "curves.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.precision.fp8_vs_bf16",
            "--steps",
            str(STEPS),
            "--json",
            str(out),
            "--plot",
            str(tmp_path / "fp8_vs_bf16.png"),
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    curves = json.loads(out.read_text())
    bf16, fp8 = final_loss(curves["bf16"]), final_loss(curves["fp8_deepseek"])
    gap = (fp8 - bf16) / bf16
    print(
        f"final loss (mean of last 20 of {STEPS} steps): bf16 {bf16:.4f}, fp8_deepseek {fp8:.4f}, "
        f"relative {gap:+.3%} (target {TARGET:.2%}: not resolved by a toy run)"
    )
    assert curves["fp8_deepseek"][0] == pytest.approx(curves["bf16"][0], rel=1e-3)  # same start
    assert bf16 < curves["bf16"][0] - 3.0  # both actually train (first loss ~7.25 nats)
    assert abs(gap) < GUARD
