"""Per-device memory of a training run on a mesh, without allocating anything.

Mesh axis sizes m_a (a in stage, data, fsdp, expert, tensor; their product is the device
count) and the logical-axis rules (`mesh.rules`) decide every tensor's split.

Training state (exact for the arrays themselves, from `nnx.eval_shape` of the model):
  a variable of shape s whose dimensions carry logical names l_1..l_r is split over the mesh
  axes `logical_to_spec(l, rules)` assigns; with k = prod of those axes' sizes, every device
  holds prod(s) / k elements (each split dimension must divide evenly: `check_divisible`).
      params      4 B x elements (fp32 master weights) + the expert-selection biases (fp32)
      grads       4 B x elements of the trained parameters (fp32, sharded like the params)
      optimizer   2 x bytes(train.moment_dtype) x elements (AdamW m and v; the two int32
                  step counters are not counted)

Activations: an ESTIMATE of one micro-batch's live activations at the peak of the backward
pass.  Per device:
  B = ceil(train.global_batch / train.micro_batches / n_b) rows (n_b: ways of the `batch`
      split), T = train.seq_len, N = B T tokens, c = bytes of the compute dtype
      (precision.policy);  h, f, f_e, f_s, V = heads, dense FFN width, expert width, shared
      width (N_s f_e) and vocab, each divided by its mesh split;  d_qk = d_h + d_h^R,
      q' = model.q_lora_rank, K experts per token, E routed experts;
  rho = expert rows computed per local token:
      K                              dropless, no expert parallelism (grouped matmul)
      E ceil(cf N K / E) / N         capacity, no expert parallelism ([E, C, d] buffer)
      P K                            dropless over P expert-parallel devices (each device's
                                     send buffer [P, C, d] has C = N K rows per destination)
      E ceil(cf N' K / E) / N'       capacity over P devices, per expert of each device's chunk
                                     of N' = N / impl.ep_overlap_chunks tokens
  per token of one layer, in bytes:
    input    c d                                     (the scan carry: saved by every policy)
    MLA      dots   c (q' + h d_qk + d_c + d_h^R + h d_h + h d_v + d)   projection outputs
             other  c (d + q' + d_c + 2 h d_qk + h d_v + d)           norms, q/k concat, o, residual
                    + attention probabilities: (4 + c) h T with impl.attention "xla"
                      (fp32 scores, probabilities in c), 4 h (log-sum-exp) with flash kernels
    dense    dots   c (2 f + d)                      other  c (f + 2 d)
    MoE      dots   4 E + c rho (2 f_e + d) + c (2 f_s + d)           router logits, experts, shared
             other  4 E + c rho (f_e + 2 d) + c f_s + 3 c d           scores, expert rows in/out,
                    + c rho 2 d with expert parallelism               the all-to-all buffers
                    (the shared-expert terms c (2 f_s + d) and c f_s only when N_s > 0)
  saved per layer by impl.remat:
    none                input + dots + other
    full                input
    save_dots           input + dots
    save_attention_out  input + c h d_v
    experts             input + dots + other - the expert rows c rho (3 f_e + 3 d) (+ a2a) of MoE layers
  activations = N [ sum over layers of the saved bytes
                    + max over layer kinds of (dots + other)   one layer recomputed / differentiated
                    + D (MoE dots + other + 5 c d)               MTP blocks (never rematerialised)
                    + c d (2 + D)                                embeddings, final norm
                    + 2 x 4 V (1 + D) ]                          fp32 logits and their gradient
                                                                 (V = 1: model.head=scalar's values)
With pipeline stages (`train.pipeline.schedule`, `parallel/pipeline/plan.py`) a rank's backward
holds one chunk's L/C MoE layers (the executor recomputes a chunk from its stashed input), so the
sum over MoE layers runs over L/C of them, plus the executor's buffers, c d per token of one
micro-batch for each of its `buffer_slots` (input and cotangent stash, K slots each, and the
receive slots); the dense prefix, MTP and logits terms stay (every rank's program holds both ends).
Not counted: XLA temporaries and fusion buffers, collective buffers besides the expert
all-to-all, weights gathered for FSDP, AdamW's update temporaries, a per-micro-batch gradient
buffer with micro_batches > 1, allocator fragmentation; under fp8 policies the residuals differ
(each projection keeps its fp8 x^T and weights, 1 byte per element, instead of x in c bytes).  Leave headroom: the compiled step's
`memory_analysis()` on the target device is the exact figure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh

from frontier_jax.model.config import Head, ImplConfig, ModelConfig
from frontier_jax.parallel.expert import expert_parallel_size
from frontier_jax.parallel.mesh import check_divisible, mesh_shape
from frontier_jax.parallel.pipeline.plan import PipelineConfig, buffer_slots, pipeline_plan
from frontier_jax.parallel.rules import MESH_AXES, logical_to_spec
from frontier_jax.runtime.program import ModelProgram


class TrainShape(Protocol):
    """What the estimate reads of the `train:` section (`train.config.TrainConfig`)."""

    global_batch: int
    micro_batches: int
    seq_len: int
    moment_dtype: str
    pipeline: PipelineConfig


GIB = 2**30


@dataclass(frozen=True)
class DeviceMemory:
    """Bytes per device (see the module docstring for what each term holds)."""

    mesh: dict[str, int]
    batch_per_device: int  # B: rows of one micro-batch on one device
    params: int
    grads: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations

    def per_device_bytes(self) -> dict[str, int]:
        return {
            "params": self.params,
            "grads": self.grads,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "total": self.total,
        }


def _ways(axes: Sequence[str], position: int, mesh: AbstractMesh, rules) -> int:
    """Devices dimension `position` of a tensor with logical names `axes` is split over."""
    mesh_axes = logical_to_spec(axes, rules)[position]
    mesh_axes = () if mesh_axes is None else (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
    return math.prod(mesh.shape[a] for a in mesh_axes)


def state_bytes(state: nnx.State, mesh: AbstractMesh, rules, itemsize: int | None = None) -> int:
    """Bytes one device holds of `state` (itemsize: override the variables' own dtype)."""
    total = 0
    for var in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        value, axes = var.get_value(), var.get_metadata()["logical_axes"]
        elements = math.prod(dim // _ways(axes, i, mesh, rules) for i, dim in enumerate(value.shape))
        total += elements * (itemsize or jnp.dtype(value.dtype).itemsize)
    return total


def _local(size: int, axes: Sequence[str], position: int, mesh, rules) -> int:
    return -(-size // _ways(axes, position, mesh, rules))


def _expert_rows_per_token(
    cfg: ModelConfig, impl: ImplConfig, tokens: int, mesh: AbstractMesh, rules
) -> float:
    """rho of the module docstring."""
    k, e, cf = cfg.num_experts_per_tok, cfg.n_routed_experts, impl.moe_capacity_factor
    p = expert_parallel_size(mesh, rules)
    if impl.moe_dispatch == "dropless":
        return p * k
    chunk = tokens if p == 1 else max(tokens // impl.ep_overlap_chunks, 1)
    return e * math.ceil(cf * chunk * k / e) / chunk


def activation_bytes(program: ModelProgram, t: TrainShape, mesh: AbstractMesh) -> tuple[int, int]:
    """(B, estimated activation bytes per device) of `program`'s model trained as `t` says, by
    the module docstring's formula."""
    cfg, rules = program.cfg, program.rules
    m = cfg.model
    plan = pipeline_plan(t, cfg.mesh, m)
    c = jnp.dtype(program.policy.compute_dtype).itemsize
    b = _local(t.global_batch // t.micro_batches, ("batch", "seq"), 0, mesh, rules)
    d, T = m.hidden_size, t.seq_len
    h = _local(m.num_heads, ("batch", "seq", "heads", "qk_head"), 2, mesh, rules)
    vocab = _local(m.vocab_size, ("batch", "seq", "vocab"), 2, mesh, rules) if m.head == Head.lm else 1
    q_lat, d_c, d_r, d_qk = m.q_lora_rank, m.kv_lora_rank, m.qk_rope_head_dim, m.qk_head_dim

    mla_dots = c * (q_lat + h * d_qk + d_c + d_r + h * m.qk_nope_head_dim + h * m.v_head_dim + d)
    probs = (4 + c) * h * T if cfg.impl.attention == "xla" else 4 * h
    mla_other = c * (d + q_lat + d_c + 2 * h * d_qk + h * m.v_head_dim + d) + probs
    kinds = {}  # layer kind -> (number of layers, dots, other) bytes per token
    if m.first_k_dense:
        f = _local(m.dense_ffn_dim, ("batch", "seq", "mlp"), 2, mesh, rules)
        kinds["dense"] = (m.first_k_dense, mla_dots + c * (2 * f + d), mla_other + c * (f + 2 * d), 0)
    moe = (0, 0)
    if m.num_moe_layers or m.mtp_depth:
        f_e = _local(m.moe_ffn_dim, ("batch", "seq", "moe_mlp"), 2, mesh, rules)
        f_s = _local(m.n_shared_experts * m.moe_ffn_dim, ("batch", "seq", "mlp"), 2, mesh, rules)
        shared = (c * (2 * f_s + d), c * f_s) if m.n_shared_experts else (0, 0)
        rho = _expert_rows_per_token(m, cfg.impl, b * T, mesh, rules)
        a2a = 2 * d if expert_parallel_size(mesh, rules) > 1 else 0
        moe = (
            mla_dots + 4 * m.n_routed_experts + c * rho * (2 * f_e + d) + shared[0],
            mla_other + 4 * m.n_routed_experts + c * rho * (f_e + 2 * d + a2a) + shared[1] + 3 * c * d,
        )
        expert_rows = c * rho * (3 * f_e + 3 * d + a2a)
        if m.num_moe_layers:
            kinds["moe"] = (plan.layers_per_chunk if plan else m.num_moe_layers, *moe, expert_rows)

    def saved(dots: float, other: float, expert_rows: float) -> float:
        return (
            c * d
            + {
                "none": dots + other,
                "full": 0,
                "save_dots": dots,
                "save_attention_out": c * h * m.v_head_dim,
                "experts": dots + other - expert_rows,
            }[cfg.impl.remat]
        )

    per_token = sum(n * saved(dots, other, rows) for n, dots, other, rows in kinds.values())
    per_token += max(dots + other for _, dots, other, _ in kinds.values())
    per_token += m.mtp_depth * (sum(moe) + 5 * c * d)
    per_token += c * d * (2 + m.mtp_depth) + 2 * 4 * vocab * (1 + m.mtp_depth)
    if plan:
        per_token += c * d * buffer_slots(plan.table)
    return b, math.ceil(b * T * per_token)


def device_memory(program: ModelProgram, train: TrainShape, num_devices: int | None = None) -> DeviceMemory:
    """Per-device bytes of `program`'s model (`runtime.model_program`; no mesh needed) trained as
    `train` says on the mesh of its `mesh:` section over `num_devices` devices (default: the
    product of the mesh sizes, which must then all be given: no mesh.data=-1).  Raises, naming
    the sizes, where the mesh does not fit the devices, a parameter or the batch."""
    mesh_cfg, rules = program.cfg.mesh, program.rules
    if num_devices is None:
        if mesh_cfg.data == -1:
            raise ValueError(
                "mesh.data=-1 (all remaining devices) needs the device count: pass it "
                "(describe --devices N) or set mesh.data explicitly"
            )
        num_devices = math.prod(getattr(mesh_cfg, a) for a in MESH_AXES)
    sizes = mesh_shape(mesh_cfg, num_devices)
    mesh = AbstractMesh(tuple(sizes.values()), tuple(sizes))
    params, biases = program.abstract_params, program.abstract_biases
    check_divisible(params, mesh, rules)
    check_divisible(biases, mesh, rules)
    batch_ways = _ways(("batch",), 0, mesh, rules)
    if train.global_batch % batch_ways:
        raise ValueError(
            f"train.global_batch={train.global_batch} is not divisible by the {batch_ways}-way "
            f"batch split over mesh axes {list(rules['batch'])} ({sizes}); use a multiple of "
            f"{batch_ways} or change mesh.*"
        )
    rows, activations = activation_bytes(program, train, mesh)
    return DeviceMemory(
        mesh=sizes,
        batch_per_device=rows,
        params=state_bytes(params, mesh, rules) + state_bytes(biases, mesh, rules),
        grads=state_bytes(params, mesh, rules, itemsize=4),
        optimizer=2 * state_bytes(params, mesh, rules, itemsize=jnp.dtype(train.moment_dtype).itemsize),
        activations=activations,
    )


def format_memory(
    mem: DeviceMemory, program: ModelProgram, train: TrainShape, device_memory_gib: float | None
) -> str:
    """The per-device table, and a verdict when a device memory size is given."""
    cfg, t = program.cfg, train
    mesh = " x ".join(f"{a} {n}" for a, n in mem.mesh.items() if n > 1) or "1 device"
    rows = [
        ("params (fp32)", mem.params, ""),
        ("grads (fp32)", mem.grads, ""),
        (f"optimizer (2 x {t.moment_dtype})", mem.optimizer, ""),
        (
            "activations (estimate)",
            mem.activations,
            f"micro-batch {mem.batch_per_device} x {t.seq_len} tokens per device, remat "
            f"{cfg.impl.remat}, precision {cfg.precision.policy}",
        ),
        ("total", mem.total, ""),
    ]
    lines = [f"per device on mesh {mesh} ({math.prod(mem.mesh.values())} devices, rules '{cfg.mesh.rules}')"]
    lines += [
        f"  {label:<30} {format_bytes(n):>14}" + (f"   ({note})" if note else "") for label, n, note in rows
    ]
    if device_memory_gib is not None:
        lines.append("  " + verdict(mem, device_memory_gib))
    return "\n".join(lines)


def format_bytes(n: int) -> str:
    """n bytes in GiB (from 1 GiB) or MiB."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.2f} MiB"


def fits(mem: DeviceMemory, device_memory_gib: float, extra_bytes: int = 0) -> bool:
    """Whether the trainer's bytes (+ extra_bytes held beside it, e.g. GRPO's) fit one device."""
    return mem.total + extra_bytes <= device_memory_gib * GIB


def verdict(mem: DeviceMemory, device_memory_gib: float, extra_bytes: int = 0) -> str:
    """ "fits: X GiB <= G GiB ..." or "WARNING: does not fit: X GiB > G GiB ..."."""
    total = (mem.total + extra_bytes) / GIB
    if fits(mem, device_memory_gib, extra_bytes):
        return f"fits: {total:.2f} GiB <= {device_memory_gib:g} GiB per device"
    return f"WARNING: does not fit: {total:.2f} GiB > {device_memory_gib:g} GiB per device"
