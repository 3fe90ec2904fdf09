"""Mesh presets (configs/mesh/) and per-device memory (frontier_jax/runtime/memory.py)."""

from __future__ import annotations

import json
import math
import re

import jax
import numpy as np
import pytest

from frontier_jax.cli import main as cli_main
from frontier_jax.config import CONFIG_DIR, load_config
from frontier_jax.model.describe import describe
from frontier_jax.parallel.mesh import build_mesh, mesh_shape, state_shardings
from frontier_jax.runtime.memory import GIB, device_memory, fits
from frontier_jax.runtime.program import model_program
from frontier_jax.train.loop import train_state_shardings
from frontier_jax.train.step import Trainer

PRESETS = sorted((CONFIG_DIR / "mesh").glob("*.yaml"))
V3 = "model/deepseek-v3-671b"


def _intended_devices(path) -> int:
    found = re.search(r"^# devices: (\d+)$", path.read_text(), re.MULTILINE)
    assert found, f"{path.name} lacks its '# devices: N' header line"
    return int(found.group(1))


def _memory(cfg, devices=None):
    """`device_memory` of a run config: its model program (shapes only) and train section."""
    return device_memory(model_program(cfg), cfg.train, devices)


# ------------------------------------------------------------------------ presets
@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_fills_its_device_count(path):
    n = _intended_devices(path)
    mesh = load_config(str(path)).mesh
    sizes = mesh_shape(mesh, n)
    assert math.prod(sizes.values()) == n
    assert mesh.data != -1, "presets give every size, so describe needs no --devices"
    dcn = math.prod(getattr(mesh.dcn, a) for a in sizes)
    assert n % dcn == 0  # each slice / node holds n / dcn devices


def test_presets_cover_the_named_machines():
    assert {p.stem for p in PRESETS} >= {"cpu-8", "gpu-1", "gpu-8", "gpu-64", "tpu-v5p-128", "tpu-v6e-256"}


def test_cpu8_preset_builds_on_the_test_devices():
    mesh = build_mesh(load_config("mesh/cpu-8").mesh)
    assert dict(mesh.shape) == {"stage": 1, "data": 2, "fsdp": 1, "expert": 4, "tensor": 1}


# ------------------------------------------------- state bytes vs real shards
def _device0_bytes(tree) -> int:
    device = jax.devices()[0]
    return sum(
        s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == device
    )


@pytest.mark.parametrize(
    "layout",
    [
        ["mesh.data=2", "mesh.expert=4"],
        ["mesh.data=1", "mesh.fsdp=2", "mesh.expert=2", "mesh.tensor=2"],
    ],
    ids=["data2-expert4", "fsdp2-expert2-tensor2"],
)
def test_state_bytes_equal_the_sharded_arrays(layout):
    """The training state laid out by the training loop's own shardings on the 8 devices: the
    shards on device 0 hold exactly the bytes `device_memory` computes."""
    cfg = load_config("model/toy", layout)
    mesh = build_mesh(cfg.mesh)
    trainer = Trainer(cfg, mesh)
    shapes = jax.eval_shape(lambda: trainer.init(0))
    state = jax.tree.map(
        lambda s, sh: jax.device_put(np.zeros(s.shape, s.dtype), sh),
        shapes,
        train_state_shardings(trainer, mesh),
    )
    grads = jax.tree.map(
        lambda p, sh: jax.device_put(np.zeros(p.shape, np.float32), sh),
        shapes.params,
        state_shardings(trainer.abstract_params, mesh, trainer.rules),
    )
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]  # mu, nu (not the step counts)

    mem = _memory(cfg)
    assert mem.mesh == dict(mesh.shape)
    assert mem.params == _device0_bytes([state.params, state.biases])
    assert mem.grads == _device0_bytes(grads)
    assert mem.optimizer == _device0_bytes(moments)
    assert mem.params < sum(x.nbytes for x in jax.tree.leaves([state.params, state.biases]))  # split


def test_bf16_moments_halve_the_optimizer_bytes():
    fp32 = _memory(load_config("model/toy", ["mesh.data=2", "mesh.expert=4"]))
    bf16 = _memory(load_config("model/toy", ["mesh.data=2", "mesh.expert=4", "train.moment_dtype=bfloat16"]))
    assert bf16.optimizer * 2 == fp32.optimizer
    assert (bf16.params, bf16.grads, bf16.activations) == (fp32.params, fp32.grads, fp32.activations)


# -------------------------------------------------------------- DeepSeek-V3
def test_deepseek_v3_does_not_fit_one_8_gpu_node(capsys):
    assert cli_main(["describe", "--config", V3, "--mesh", "mesh/gpu-8", "--device-memory-gib", "80"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"WARNING: does not fit: [\d.]+ GiB > 80 GiB", out), out
    assert (
        cli_main(["describe", "--config", V3, "--mesh", "mesh/gpu-8", "--device-memory-gib", "80", "--json"])
        == 0
    )
    captured = capsys.readouterr()
    info = json.loads(captured.out)
    assert "does not fit" in captured.err
    assert info["fits"] is False and info["mesh"]["expert"] == 8
    per_device = info["per_device_bytes"]
    assert set(per_device) == {"params", "grads", "optimizer", "activations", "total"}
    assert per_device["params"] > 80 * GIB  # the fp32 weights alone overflow an 80 GiB GPU
    assert per_device["total"] == sum(v for k, v in per_device.items() if k != "total")


def _v3(*overrides):
    return load_config(V3, ["mesh.data=1", "train.global_batch=2048", *overrides])


def test_deepseek_v3_param_bytes_scale_with_the_mesh():
    """1 device: 4 B x every parameter (+ the fp32 expert biases).  Expert axis e: the tensors
    with an `expert` dimension (routed experts, router kernels and biases; bytes X) shrink by
    e, the rest stays:  params(e) = params(1) - X (1 - 1/e).  FSDP axis: the embed-dimension
    tensors shrink by f, so params(f=1) - params(f=2) = 2 (params(f=2) - params(f=4))."""
    m = _v3().model
    moe_blocks = m.num_moe_layers + m.mtp_depth
    one = _memory(_v3()).params
    biases = 4 * moe_blocks * m.n_routed_experts
    assert one == 4 * describe(m)["total_params_with_mtp"] + biases
    expert_bytes = 4 * moe_blocks * m.n_routed_experts * m.hidden_size * (3 * m.moe_ffn_dim + 1) + biases
    for e in (8, 32, 256):
        assert _memory(_v3(f"mesh.expert={e}")).params * e == one * e - expert_bytes * (e - 1)
    f1, f2, f4 = (_memory(_v3("mesh.expert=8", f"mesh.fsdp={f}")).params for f in (1, 2, 4))
    assert f1 - f2 == 2 * (f2 - f4) > 0


def test_deepseek_v3_fits_a_deepseek_sized_cluster():
    """2048 GPUs (expert 64 x fsdp 32), bf16 compute and moments, full remat, flash attention,
    capacity dispatch (dropless expert parallelism sizes its all-to-all buffers for the worst
    case, P K rows per token: far over 80 GiB at P = 64)."""
    cfg_overrides = [
        "mesh.expert=64",
        "mesh.fsdp=32",
        "train.global_batch=2048",
        "train.micro_batches=2",
        "train.seq_len=4096",
        "impl.remat=full",
        "precision.policy=bf16",
        "train.moment_dtype=bfloat16",
        "impl.attention=cudnn",
        "impl.moe_dispatch=capacity",
    ]
    cfg = _v3(*cfg_overrides)
    mem = _memory(cfg)
    assert mem.batch_per_device == 1 and fits(mem, 80)
    assert not fits(_memory(_v3(*[o for o in cfg_overrides if "moe_dispatch" not in o])), 80)


# ------------------------------------------------------------ activations
def test_activation_estimate_follows_the_remat_policy_and_batch():
    def act(*overrides):
        return _memory(
            load_config("model/toy", ["mesh.data=2", "mesh.expert=4", "train.global_batch=16", *overrides])
        ).activations

    policies = [act(f"impl.remat={p}") for p in ("full", "save_attention_out", "save_dots", "none")]
    assert policies == sorted(policies) and len(set(policies)) == 4
    # recomputing only the routed experts' rows saves less than full remat, more than none
    assert policies[0] < act("impl.remat=experts") < policies[-1]
    assert act("train.micro_batches=2") * 2 == act()  # B = 16 / 2 / 8 rows instead of 16 / 8
    assert act("precision.policy=bf16") < act()
    bf16 = act("precision.policy=bf16")
    assert act("precision.policy=bf16", "impl.attention=cudnn") < bf16  # no [T, S] scores
    # expert parallelism (expert axis 4): dropless all-to-all buffers hold 4 K rows per token
    assert act("impl.moe_dispatch=capacity") < act()


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "overrides, devices, expected",
    [
        (["mesh.data=2", "mesh.expert=3"], 8, [r"multiply to 6", r"8 devices", r"'expert': 3"]),
        (
            ["mesh.expert=16"],
            16,
            [r"'expert' dimension \(8\)", r"\['expert'\] of sizes \[16\]", r"mesh\.expert"],
        ),
        (["mesh.tensor=8"], 8, [r"'heads' dimension \(4\)", r"\['tensor'\] of sizes \[8\]", r"mesh\.tensor"]),
        (["mesh.expert=8", "train.global_batch=4"], 8, [r"train\.global_batch=4", r"8-way"]),
        ([], None, [r"mesh\.data=-1", r"--devices"]),
    ],
    ids=["product", "experts", "heads", "batch", "data-unset"],
)
def test_invalid_mesh_names_the_axis_and_sizes(overrides, devices, expected):
    cfg = load_config("model/toy", overrides)
    with pytest.raises(ValueError) as err:
        _memory(cfg, devices)
    for pattern in expected:
        assert re.search(pattern, str(err.value)), str(err.value)


def test_cli_mesh_preset_then_overrides(capsys):
    assert (
        cli_main(
            [
                "describe",
                "--config",
                "model/toy",
                "--mesh",
                "mesh/gpu-8",
                "--json",
                "mesh.expert=4",
                "mesh.data=2",
            ]
        )
        == 0
    )
    info = json.loads(capsys.readouterr().out)
    assert info["mesh"]["expert"] == 4 and info["mesh"]["data"] == 2 and info["fits"] is None
    assert cli_main(["describe", "--config", "model/toy", "--mesh", "mesh/gpu-8", "mesh.expert=3"]) == 2
    assert (
        "'expert' dimension (8) does not split over mesh axes ['expert'] of sizes [3]"
        in capsys.readouterr().err
    )
