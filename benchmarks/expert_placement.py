"""Tokens each expert device receives, per MoE layer, without and with a placement of redundant
experts: one prefill forward of the engine's step over held-out text, on D fake CPU devices.

    python benchmarks/expert_placement.py --checkpoint runs/toy [--devices 8 --replicas 8]
        [--plan PLAN.json] [--rows 16 --seq 128]

The text is the last standard-library files of the embedded code data (the toy run trains on
the others first; held out in practice), cut into 2 rows sequences of seq tokens: the even
ones to plan from, the odd ones to measure on.  The forward runs the engine's prefill step with the
placement applied on mesh expert=D (the experts on the slots' copies, `Engine.set_placement`);
its routed experts give the assignments each device receives as the dispatch routes them
(`parallel.expert.received_per_device`), before (expert e on device e // (E/D)) and after.  The
placement is `--plan` (a `frontier-jax experts plan` file) or planned with
`parallel.placement.plan` from the expert load of a forward over the planning text.  Prints
max/mean over devices per layer and overall.
"""

from __future__ import annotations

import argparse
import os


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a training run directory (default: the toy model, random init)")
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument("--plan", help="a placement file (default: planned from this forward's load)")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    return parser.parse_args()


if __name__ == "__main__":  # fake CPU devices, set before jax starts
    ARGS = _args()
    os.environ["XLA_FLAGS"] = (
        f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={ARGS.devices}"
    )

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from frontier_jax.config import load_config  # noqa: E402
from frontier_jax.data.embedded import code_dataset  # noqa: E402
from frontier_jax.data.tokenizer import byte_tokenizer  # noqa: E402
from frontier_jax.infer import Engine, InferConfig  # noqa: E402
from frontier_jax.infer.step import make_step  # noqa: E402
from frontier_jax.model.latent_cache import Pages  # noqa: E402
from frontier_jax.parallel.config import MeshConfig  # noqa: E402
from frontier_jax.parallel.expert import received_per_device  # noqa: E402
from frontier_jax.parallel.placement import Placement  # noqa: E402
from frontier_jax.parallel.rules import use_sharding  # noqa: E402
from frontier_jax.precision.config import PrecisionConfig  # noqa: E402
from frontier_jax.runtime.program import ModelProgram, ModelSections, build_model_program  # noqa: E402
from frontier_jax.runtime.restore import restore_params  # noqa: E402


def held_out_tokens(rows: int, seq: int) -> np.ndarray:
    """[rows, seq] byte-tokenizer ids of the standard-library files, from the last one backwards."""
    tokenizer, files, ids = byte_tokenizer(), code_dataset(), []
    for index in range(len(files) - 1, -1, -1):
        ids += tokenizer.encode(files[index])
        if len(ids) >= rows * seq:
            break
    return np.asarray(ids[: rows * seq], np.int32).reshape(rows, seq)


def routed_experts(engine: Engine, program: ModelProgram, params, biases, ids: np.ndarray) -> np.ndarray:
    """The experts each MoE layer routes each token of one prefill forward of `ids` [B, T] to,
    in the engine's prefill step with its weights (its placement applied): [L, B T, K]."""
    rows, seq = ids.shape
    if engine.placement is not None:
        program = program.with_impl(program.cfg.impl.replace(expert_replicas=engine.placement.replicas))
    step = make_step(nnx.graphdef(program.model(params, biases)), absorbed=False)
    per_seq = engine.layout.blocks_per_seq
    table = 1 + np.arange(rows * per_seq, dtype=np.int32).reshape(rows, per_seq)
    pages = Pages(jnp.asarray(table), jnp.ones((rows, seq), bool))
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (rows, seq))
    with use_sharding(engine.mesh, engine.rules):  # the cache is donated: keep the step's
        _, _, engine.cache, experts = step(
            engine.state, engine.cache, jnp.asarray(ids), positions, pages, jnp.zeros((rows, 1), jnp.int32)
        )
    experts = np.asarray(experts)
    return experts.reshape(experts.shape[0], rows * seq, -1)


def report(name: str, counts: np.ndarray) -> None:
    ratio = counts.max(1) / counts.mean(1)
    layers = "  ".join(f"layer {i}: {r:.2f}" for i, r in enumerate(ratio))
    print(f"{name:>7}  max/mean per device  {layers}  overall {counts.max() / counts.mean():.2f}")
    for i, row in enumerate(counts.astype(int)):
        print(f"         layer {i} tokens per device {row.tolist()}")


def main(args: argparse.Namespace) -> None:
    mesh = MeshConfig(expert=args.devices)
    if args.checkpoint:
        restored = restore_params(args.checkpoint, mesh=mesh)
        program, params, biases = restored.program, restored.params, restored.biases
    else:
        cfg = load_config("model/toy")
        program = build_model_program(ModelSections(cfg.model, mesh, PrecisionConfig()))
        params, biases = program.init(0)
    infer = InferConfig(block_size=args.seq, max_seqs=args.rows, max_len=args.seq, prefill_chunk=args.seq)
    tokens = held_out_tokens(2 * args.rows, args.seq)
    planning_ids, ids = tokens[0::2], tokens[1::2]
    plain = Engine.from_program(program, params, biases, infer=infer)
    experts = routed_experts(plain, program, params, biases, ids)
    layers, experts_per_layer = experts.shape[0], program.cfg.model.n_routed_experts
    seen = routed_experts(plain, program, params, biases, planning_ids)
    load = np.stack([np.bincount(e.reshape(-1), minlength=experts_per_layer) for e in seen])
    if args.plan:
        placement = Placement.load(args.plan)
    else:
        from frontier_jax.parallel.placement import plan

        placement = plan(load, replicas=args.replicas, devices=args.devices)
    placed = Engine.from_program(program, params, biases, infer=infer, placement=placement)
    experts_placed = routed_experts(placed, program, params, biases, ids)
    identical = np.array_equal(experts_placed, experts)
    print(
        f"{ids.size} tokens, {layers} MoE layers x {experts_per_layer} experts, {args.devices} expert devices, "
        f"{placement.replicas} replicas; routing with the placement identical: {identical}"
    )
    report(
        "before", received_per_device(experts, Placement.identity(layers, experts_per_layer), args.devices)
    )
    report("after", received_per_device(experts_placed, placement, args.devices))


if __name__ == "__main__":
    main(ARGS)
