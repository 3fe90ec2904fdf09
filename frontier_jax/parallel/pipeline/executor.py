"""Run a lowered pipeline schedule as one SPMD program over the mesh's `stage` axis.

Model contract (pure functions, shapes per micro-batch ``b``):

- ``embed(ends, b) -> x``                        ``x: [mb, seq, d]`` (in front of chunk 0)
- ``chunk(chunk_params, x, b, c) -> (y, loss, stats)``  model chunk ``c`` (its global index, an
  int32 scalar: which of the model's layers it holds, e.g. to pick their slice of per-layer
  inputs; e.g. a scan over its layers): its output, a scalar term of the loss it adds (e.g. its
  layers' balance loss) and statistics (a pytree, not differentiated, e.g. its layers' expert loads)
- ``head(ends, y, b) -> (loss, metrics)``        the loss of the last chunk's output and its
  metrics (a pytree, not differentiated)

``ends`` holds the parameters both ends use (embedding, head, anything shared between them), so
the model is, with ``x_0 = embed(ends, b_m)`` and ``(x_{c+1}, l_{c,m}, s_{c,m}) = chunk_c(x_c)``,

    L = sum_m [ head(ends, x_C, b_m).loss + sum_c l_{c,m} ]

and the executor returns ``L``, ``sum_m metrics_m``, ``stats[c] = sum_m s_{c,m}`` (per chunk) and
``dL / d(chunk_params, ends)``.

Layout: ``chunk_params`` leaves are ``[C, ...]`` in chunk order; `stack_for_stages` reorders
them to ``[P, chunks per rank, ...]`` (rank r's local chunks, the schedule's placement) and the
leading axis is sharded over ``stage``. Inside ``shard_map`` (manual over ``stage`` only; the
other mesh axes stay automatic, and an expert-parallel ``shard_map`` nests inside a stage) a
``lax.scan`` walks the tick table; at each tick every rank reads its row, ``lax.switch``es on
the op (idle / F / B / I / W / FB) with chunk, micro-batch and slots as data, and then, outside
the switch, two ``ppermute``s (+1 and -1 around the ring) carry an (activation, gradient) pair
each; received payloads go to the slots the table names. The ends run under ``lax.cond`` on the
rank's chunk (the branch depends on the rank only, so collectives inside them stay within a stage).

Stash: the input of each live chunk (``[K, mb, seq, d]``, K the table's stash slots), and for a
split backward the output cotangent; a backward recomputes its chunk's forward inside its VJP
(per-chunk rematerialisation), so weights are never stashed. ``I`` is the VJP with respect to
the chunk input only, ``W`` the VJP with respect to the parameters from the stashed input and
cotangent. Bubbles can be filled with NaN (``bubble_fill``) to prove nothing unwritten is read.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from frontier_jax.parallel.pipeline.schedule import Field, Op, Send, TickTable

STAGE = "stage"


def stack_for_stages(table: TickTable, chunk_params):
    """``[C, ...]`` chunk-ordered leaves -> ``[P, v, ...]`` with rank r's local chunks in row r
    (a reshape where rank r holds chunks ``r v .. r v + v - 1``, otherwise a gather)."""
    order = np.array(table.schedule.local_chunks)  # [P, v] global chunk ids
    if (order.reshape(-1) == np.arange(order.size)).all():
        return jax.tree.map(lambda a: a.reshape(order.shape + a.shape[1:]), chunk_params)
    return jax.tree.map(lambda a: a[order], chunk_params)


def unstack_from_stages(table: TickTable, stacked):
    """Inverse of `stack_for_stages`."""
    order = np.array(table.schedule.local_chunks).reshape(-1)
    flat = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), stacked)
    if (order == np.arange(order.size)).all():
        return flat
    return jax.tree.map(lambda a: a[np.argsort(order)], flat)


def _zeros(tree):
    return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), tree)


def pipeline_value_and_grad(
    table: TickTable,
    mesh: jax.sharding.Mesh,
    embed: Callable,
    chunk: Callable,
    head: Callable,
    *,
    bubble_fill: float = 0.0,
):
    """Build ``f(stacked_chunk_params, ends, batch) -> (loss, metrics, stats, grads, trace)``.

    ``batch`` leaves are ``[M, ...]`` (micro-batch major); ``stats`` leaves ``[P, v, ...]`` like
    the stacked parameters (`unstack_from_stages` gives ``[C, ...]``); ``grads = (d_stacked,
    d_ends)`` in fp32; ``trace`` is ``int32[ticks, P]``, the op each rank executed at each tick."""
    s = table.schedule
    last = s.chunks - 1
    local_chunks = jnp.asarray(np.array(s.local_chunks), jnp.int32)  # [P, v]
    ticks = jnp.asarray(table.table)

    def chunk_with_ends(params_j, ends, x_in, batch_m, global_chunk):
        """((y, loss), (stats, metrics)) of one chunk, with the embedding in front of chunk 0
        and the head after the last chunk (each under `lax.cond`)."""
        x = jax.lax.cond(global_chunk == 0, lambda: embed(ends, batch_m).astype(x_in.dtype), lambda: x_in)
        y, loss, stats = chunk(params_j, x, batch_m, global_chunk)

        def head_of(y):
            h_loss, metrics = head(ends, y, batch_m)
            return h_loss.astype(jnp.float32), metrics

        shapes = jax.eval_shape(head_of, y)
        h_loss, metrics = jax.lax.cond(global_chunk == last, head_of, lambda _: _zeros(shapes), y)
        return (y, loss.astype(jnp.float32) + h_loss), (stats, metrics)

    def per_rank(stacked, ends, batch, x_shape, aux_shape):
        rank = jax.lax.axis_index(STAGE)
        params = jax.tree.map(lambda a: a[0], stacked)  # [v, ...]
        mine = local_chunks[rank]
        v = s.chunks_per_rank
        fill = jnp.full(x_shape.shape, bubble_fill, x_shape.dtype)
        stats_shape, metrics_shape = aux_shape

        def buffers(n):
            return jnp.broadcast_to(fill, (n,) + fill.shape)

        carry0 = dict(
            act=buffers(table.act_slots),
            grad=buffers(table.grad_slots),
            stash_x=buffers(table.stash_slots),
            stash_g=buffers(table.stash_slots),
            grads=jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), (params, ends)),
            loss=jnp.float32(0),
            stats=jax.tree.map(lambda a: jnp.zeros((v,) + a.shape, a.dtype), stats_shape),
            metrics=_zeros(metrics_shape),
        )

        def pick(tree, j):
            return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, j, 0, keepdims=False), tree)

        def forward(c, row):
            j, m = row[Field.F_CHUNK], row[Field.F_MB]
            x_in = c["act"][jnp.maximum(row[Field.F_INPUT], 0)]
            (y, loss), (stats, metrics) = chunk_with_ends(
                pick(params, j), ends, x_in, pick(batch, m), mine[j]
            )
            c = dict(
                c,
                stash_x=c["stash_x"].at[row[Field.F_STASH]].set(x_in),
                loss=c["loss"] + loss,
                stats=jax.tree.map(lambda a, d: a.at[j].add(d), c["stats"], stats),
                metrics=jax.tree.map(jnp.add, c["metrics"], metrics),
            )
            return c, y

        def output_cotangent(c, row):
            """The gradient of the loss w.r.t. the chunk's output (zero for the last chunk, whose
            output only feeds the head inside the chunk's own function)."""
            j = row[Field.B_CHUNK]
            received = c["grad"][jnp.maximum(row[Field.B_INPUT], 0)]
            return jnp.where(mine[j] == last, jnp.zeros_like(fill), received)

        def vjp_of(c, row, g_y, wrt_params: bool, wrt_input: bool):
            """Pull (g_y, dL/dloss = 1) back through the chunk (with its ends), recomputing its
            forward from the stashed input."""
            j, m = row[Field.B_CHUNK], row[Field.B_MB]
            x_in = c["stash_x"][row[Field.B_STASH]]

            def fn(p, e, x):
                return chunk_with_ends(p, e, x, pick(batch, m), mine[j])

            p_j = pick(params, j)
            seed = (g_y, jnp.float32(1))
            if wrt_params and wrt_input:
                _, pullback, _ = jax.vjp(fn, p_j, ends, x_in, has_aux=True)
                dp, de, dx = pullback(seed)
            elif wrt_input:
                _, pullback, _ = jax.vjp(lambda x: fn(p_j, ends, x), x_in, has_aux=True)
                (dx,) = pullback(seed)
                dp = de = None
            else:
                _, pullback, _ = jax.vjp(lambda p, e: fn(p, e, x_in), p_j, ends, has_aux=True)
                dp, de = pullback(seed)
                dx = None
            if dp is not None:
                acc_p, acc_e = c["grads"]
                acc_p = jax.tree.map(lambda a, d: a.at[j].add(d.astype(jnp.float32)), acc_p, dp)
                acc_e = jax.tree.map(lambda a, d: a + d.astype(jnp.float32), acc_e, de)
                c = dict(c, grads=(acc_p, acc_e))
            return c, dx

        def idle(c, row):
            return c, fill, fill

        def op_f(c, row):
            c, y = forward(c, row)
            return c, y, fill

        def op_b(c, row):
            c, dx = vjp_of(c, row, output_cotangent(c, row), True, True)
            return c, fill, dx

        def op_i(c, row):
            g = output_cotangent(c, row)
            c = dict(c, stash_g=c["stash_g"].at[row[Field.B_STASH]].set(g))
            c, dx = vjp_of(c, row, g, False, True)
            return c, fill, dx

        def op_w(c, row):
            c, _ = vjp_of(c, row, c["stash_g"][row[Field.B_STASH]], True, False)
            return c, fill, fill

        def op_fb(c, row):
            c, _, dx = op_b(c, row)  # the backward reads its stash slot before the forward writes one
            c, y = forward(c, row)
            return c, y, dx

        # only the ops the table uses get a branch (each compiles the chunk once more)
        ops = {Op.IDLE: idle, Op.F: op_f, Op.B: op_b, Op.I: op_i, Op.W: op_w, Op.FB: op_fb}
        used = sorted(set(np.unique(table.table[:, :, Field.OP]).tolist()) | {Op.IDLE})
        branches = [ops[Op(op)] for op in used]
        branch_of = np.zeros(len(Op), np.int32)
        branch_of[used] = np.arange(len(used))

        def write(buf, slot, value):
            safe = jnp.maximum(slot, 0)
            return jax.lax.dynamic_update_index_in_dim(buf, jnp.where(slot >= 0, value, buf[safe]), safe, 0)

        def tick(c, table_t):
            row = table_t[rank]
            c, act_out, grad_out = jax.lax.switch(jnp.asarray(branch_of)[row[Field.OP]], branches, c, row)
            ring = s.ranks
            to_next = jnp.stack(
                [
                    jnp.where(row[Field.F_SEND] == Send.NEXT, act_out, fill),
                    jnp.where(row[Field.B_SEND] == Send.NEXT, grad_out, fill),
                ]
            )
            to_prev = jnp.stack(
                [
                    jnp.where(row[Field.F_SEND] == Send.PREV, act_out, fill),
                    jnp.where(row[Field.B_SEND] == Send.PREV, grad_out, fill),
                ]
            )
            from_prev = jax.lax.ppermute(to_next, STAGE, [(i, (i + 1) % ring) for i in range(ring)])
            from_next = jax.lax.ppermute(to_prev, STAGE, [(i, (i - 1) % ring) for i in range(ring)])
            act, grad = c["act"], c["grad"]
            act = write(act, row[Field.RECV_ACT_PREV], from_prev[0])
            grad = write(grad, row[Field.RECV_GRAD_PREV], from_prev[1])
            act = write(act, row[Field.RECV_ACT_NEXT], from_next[0])
            grad = write(grad, row[Field.RECV_GRAD_NEXT], from_next[1])
            act = write(act, row[Field.RECV_ACT_SELF], act_out)
            grad = write(grad, row[Field.RECV_GRAD_SELF], grad_out)
            return dict(c, act=act, grad=grad), row[Field.OP]

        c, trace = jax.lax.scan(tick, carry0, ticks)
        d_params, d_ends = c["grads"]
        loss, metrics, d_ends = jax.lax.psum((c["loss"], c["metrics"], d_ends), STAGE)
        per_stage = lambda t: jax.tree.map(lambda a: a[None], t)  # noqa: E731
        return loss, metrics, per_stage(c["stats"]), (per_stage(d_params), d_ends), trace[:, None]

    def run(stacked, ends, batch):
        params0 = jax.tree.map(lambda a: a[0, 0], stacked)
        batch0 = jax.tree.map(lambda a: a[0], batch)
        x_shape = jax.eval_shape(embed, ends, batch0)
        _, _, stats_shape = jax.eval_shape(chunk, params0, x_shape, batch0, jnp.int32(0))
        metrics_shape = jax.eval_shape(lambda e, y, b: head(e, y, b)[1], ends, x_shape, batch0)
        body = functools.partial(per_rank, x_shape=x_shape, aux_shape=(stats_shape, metrics_shape))
        stage_spec = jax.tree.map(lambda _: P(STAGE), stacked)
        rep = lambda t: jax.tree.map(lambda _: P(), t)  # noqa: E731
        return jax.shard_map(
            body,
            mesh=mesh,
            axis_names={STAGE},
            check_vma=False,
            in_specs=(stage_spec, rep(ends), rep(batch)),
            out_specs=(
                P(),
                rep(metrics_shape),
                jax.tree.map(lambda _: P(STAGE), stats_shape),
                (stage_spec, rep(ends)),
                P(None, STAGE),
            ),
        )(stacked, ends, batch)

    return run
