"""Run a lowered pipeline schedule as one SPMD program over the mesh's `stage` axis.

Model contract (pure functions, shapes per micro-batch):

- ``embed(embed_params, batch_m) -> x``          ``x: [mb, seq, d]`` (chunk 0 only)
- ``chunk(chunk_params, x) -> x``                 one model chunk (e.g. a scan over its layers)
- ``head_loss(head_params, x, batch_m) -> loss``  scalar (last chunk only)

so the model is ``loss_m = head_loss(hp, chunk_{C-1}(... chunk_0(embed(ep, b_m)))), b_m)`` and
the executor returns ``(sum_m loss_m, d/d(chunk_params, ep, hp) of that sum)``.

Layout: ``chunk_params`` leaves are ``[C, ...]`` in chunk order; `stack_for_stages` reorders
them to ``[P, chunks per rank, ...]`` (rank r's local chunks, the schedule's placement) and the
leading axis is sharded over ``stage``. Inside ``shard_map`` (manual over ``stage`` only) a
``lax.scan`` walks the tick table; at each tick every rank reads its row, ``lax.switch``es on
the op (idle / F / B / I / W / FB) with chunk, micro-batch and slots as data, and then, outside
the switch, two ``ppermute``s (+1 and -1 around the ring) carry an (activation, gradient) pair
each; received payloads go to the slots the table names.

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
    """``[C, ...]`` chunk-ordered leaves -> ``[P, v, ...]`` with rank r's local chunks in row r."""
    order = np.array(table.schedule.local_chunks)  # [P, v] global chunk ids
    return jax.tree.map(lambda a: a[order], chunk_params)


def unstack_from_stages(table: TickTable, stacked):
    """Inverse of `stack_for_stages`."""
    order = np.array(table.schedule.local_chunks).reshape(-1)
    inverse = np.argsort(order)
    return jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:])[inverse], stacked)


def pipeline_value_and_grad(
    table: TickTable,
    mesh: jax.sharding.Mesh,
    embed: Callable,
    chunk: Callable,
    head_loss: Callable,
    *,
    bubble_fill: float = 0.0,
):
    """Build ``f(stacked_chunk_params, embed_params, head_params, batch) -> (loss, grads, trace)``.

    ``batch`` leaves are ``[M, ...]`` (micro-batch major); ``grads = (d_stacked, d_embed, d_head)``;
    ``trace`` is ``int32[ticks, P]``, the op each rank executed at each tick (for tests)."""
    s = table.schedule
    last = s.chunks - 1
    local_chunks = jnp.asarray(np.array(s.local_chunks), jnp.int32)  # [P, v]
    ticks = jnp.asarray(table.table)

    def chunk_with_ends(params_j, ep, hp, x_in, batch_m, global_chunk):
        """(y, loss) of one chunk, with the embedding in front of chunk 0 and head + loss after
        the last chunk (selected with `lax.cond`; the branch depends on the rank only)."""
        x = jax.lax.cond(global_chunk == 0, lambda: embed(ep, batch_m).astype(x_in.dtype), lambda: x_in)
        y = chunk(params_j, x)
        loss = jax.lax.cond(
            global_chunk == last,
            lambda: head_loss(hp, y, batch_m).astype(jnp.float32),
            lambda: jnp.float32(0),
        )
        return y, loss

    def per_rank(stacked, ep, hp, batch, mb_shape):
        rank = jax.lax.axis_index(STAGE)
        params = jax.tree.map(lambda a: a[0], stacked)  # [v, ...]
        mine = local_chunks[rank]
        fill = jnp.full(mb_shape.shape, bubble_fill, mb_shape.dtype)
        zeros_like_params = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), (params, ep, hp))

        def buffers(n):
            return jnp.broadcast_to(fill, (n,) + fill.shape)

        carry0 = dict(
            act=buffers(table.act_slots),
            grad=buffers(table.grad_slots),
            stash_x=buffers(table.stash_slots),
            stash_g=buffers(table.stash_slots),
            grads=zeros_like_params,
            loss=jnp.float32(0),
        )

        def pick(tree, j):
            return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, j, 0, keepdims=False), tree)

        def batch_of(m):
            return pick(batch, m)

        def forward(c, row):
            j, m = row[Field.F_CHUNK], row[Field.F_MB]
            x_in = c["act"][jnp.maximum(row[Field.F_INPUT], 0)]
            y, loss = chunk_with_ends(pick(params, j), ep, hp, x_in, batch_of(m), mine[j])
            c = dict(c, stash_x=c["stash_x"].at[row[Field.F_STASH]].set(x_in), loss=c["loss"] + loss)
            return c, y

        def cotangents(c, row):
            j = row[Field.B_CHUNK]
            is_last = mine[j] == last
            g = jnp.where(is_last, jnp.zeros_like(fill), c["grad"][jnp.maximum(row[Field.B_INPUT], 0)])
            return g, is_last.astype(jnp.float32)

        def vjp_of(c, row, g_y, g_loss, wrt_params: bool, wrt_input: bool):
            j, m = row[Field.B_CHUNK], row[Field.B_MB]
            x_in = c["stash_x"][row[Field.B_STASH]]

            def fn(p, e, h, x):
                return chunk_with_ends(p, e, h, x, batch_of(m), mine[j])

            p_j = pick(params, j)
            if wrt_params and wrt_input:
                _, pullback = jax.vjp(fn, p_j, ep, hp, x_in)
                dp, de, dh, dx = pullback((g_y, g_loss))
            elif wrt_input:
                _, pullback = jax.vjp(lambda x: fn(p_j, ep, hp, x), x_in)
                (dx,) = pullback((g_y, g_loss))
                dp = de = dh = None
            else:
                _, pullback = jax.vjp(lambda p, e, h: fn(p, e, h, x_in), p_j, ep, hp)
                dp, de, dh = pullback((g_y, g_loss))
                dx = None
            if dp is not None:
                acc_p, acc_e, acc_h = c["grads"]
                acc_p = jax.tree.map(lambda a, d: a.at[j].add(d.astype(jnp.float32)), acc_p, dp)
                acc_e = jax.tree.map(lambda a, d: a + d.astype(jnp.float32), acc_e, de)
                acc_h = jax.tree.map(lambda a, d: a + d.astype(jnp.float32), acc_h, dh)
                c = dict(c, grads=(acc_p, acc_e, acc_h))
            return c, dx

        def idle(c, row):
            return c, fill, fill

        def op_f(c, row):
            c, y = forward(c, row)
            return c, y, fill

        def op_b(c, row):
            g, g_loss = cotangents(c, row)
            c, dx = vjp_of(c, row, g, g_loss, True, True)
            return c, fill, dx

        def op_i(c, row):
            g, g_loss = cotangents(c, row)
            c = dict(c, stash_g=c["stash_g"].at[row[Field.B_STASH]].set(g))
            c, dx = vjp_of(c, row, g, g_loss, False, True)
            return c, fill, dx

        def op_w(c, row):
            j = row[Field.B_CHUNK]
            g_loss = (mine[j] == last).astype(jnp.float32)
            c, _ = vjp_of(c, row, c["stash_g"][row[Field.B_STASH]], g_loss, True, False)
            return c, fill, fill

        def op_fb(c, row):
            c, _, dx = op_b(c, row)  # the backward reads its stash slot before the forward writes one
            c, y = forward(c, row)
            return c, y, dx

        branches = [None] * len(Op)
        for op, fn in (
            (Op.IDLE, idle),
            (Op.F, op_f),
            (Op.B, op_b),
            (Op.I, op_i),
            (Op.W, op_w),
            (Op.FB, op_fb),
        ):
            branches[op] = fn

        def write(buf, slot, value):
            safe = jnp.maximum(slot, 0)
            return jax.lax.dynamic_update_index_in_dim(buf, jnp.where(slot >= 0, value, buf[safe]), safe, 0)

        def tick(c, table_t):
            row = table_t[rank]
            c, act_out, grad_out = jax.lax.switch(row[Field.OP], branches, c, row)
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
        d_params, d_embed, d_head = c["grads"]
        loss = jax.lax.psum(c["loss"], STAGE)
        d_embed, d_head = jax.lax.psum((d_embed, d_head), STAGE)
        return loss, (jax.tree.map(lambda a: a[None], d_params), d_embed, d_head), trace[:, None]

    def run(stacked, ep, hp, batch):
        x_shape = jax.eval_shape(embed, ep, jax.tree.map(lambda a: a[0], batch))
        body = functools.partial(per_rank, mb_shape=x_shape)
        stage_spec = jax.tree.map(lambda _: P(STAGE), stacked)
        rep = lambda t: jax.tree.map(lambda _: P(), t)  # noqa: E731
        return jax.shard_map(
            body,
            mesh=mesh,
            axis_names={STAGE},
            check_vma=False,
            in_specs=(stage_spec, rep(ep), rep(hp), rep(batch)),
            out_specs=(P(), (stage_spec, rep(ep), rep(hp)), P(None, STAGE)),
        )(stacked, ep, hp, batch)

    return run
