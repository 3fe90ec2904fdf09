"""The SPMD executor gives the loss, metrics, per-chunk statistics and gradients of the
unpipelined model (jax.grad over the same micro-batches, fp32) for every schedule, executes
exactly its tick table, and never reads a bubble (NaN-filled buffers do not leak)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from frontier_jax.parallel.pipeline import schedule as S
from frontier_jax.parallel.pipeline.executor import (
    pipeline_value_and_grad,
    stack_for_stages,
    unstack_from_stages,
)
from frontier_jax.parallel.pipeline.plan import buffer_slots

VOCAB, D, SEQ, MB, LAYERS = 11, 8, 4, 2, 2  # layers per chunk


def embed(ends, b):
    return ends["embed"][b["tokens"]]


def chunk(p, x, b, c):
    """Layers x + tanh(x W + b + 0.1 c) (c: the chunk's global index, so that a chunk run with
    another chunk's index is caught); a loss term 0.01 mean(y^2) per layer (like a balance loss)
    and per-layer statistics (the sum of y over the rows and positions, like expert loads)."""

    def layer(x, w):
        y = x + jnp.tanh(x @ w["w"] + w["b"] + 0.1 * c)
        return y, (0.01 * jnp.mean(y * y), y.sum((0, 1)))

    y, (terms, sums) = jax.lax.scan(layer, x, p)
    return y, terms.sum(), {"sums": sums, "rows": jnp.int32(b["tokens"].shape[0])}


def head(ends, x, b):
    logits = x @ ends["head"]
    logp = jax.nn.log_softmax(logits, -1)
    nll = -jnp.take_along_axis(logp, b["labels"][..., None], -1)
    return jnp.mean(nll), {"nll_sum": nll.sum(), "tokens": jnp.int32(nll.size)}


def model(n_chunks, M, seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    chunks = {
        "w": 0.4 * jax.random.normal(k[0], (n_chunks, LAYERS, D, D)),
        "b": 0.1 * jax.random.normal(k[1], (n_chunks, LAYERS, D)),
    }
    ends = {"embed": jax.random.normal(k[2], (VOCAB, D)), "head": 0.5 * jax.random.normal(k[3], (D, VOCAB))}
    tokens = jax.random.randint(k[4], (M, MB, SEQ + 1), 0, VOCAB)
    return chunks, ends, {"tokens": tokens[..., :-1], "labels": tokens[..., 1:]}


def reference(chunks, ends, batch):
    """The unpipelined model, micro-batch by micro-batch in a Python loop: the summed loss
    differentiated by jax.grad, metrics and per-chunk statistics summed."""

    def total(chunks, ends):
        loss, metrics, stats = 0.0, [], []
        for m in range(batch["tokens"].shape[0]):
            b = jax.tree.map(lambda a: a[m], batch)
            x, per_chunk = embed(ends, b), []
            for c in range(chunks["w"].shape[0]):
                x, term, st = chunk(jax.tree.map(lambda a: a[c], chunks), x, b, c)
                loss, per_chunk = loss + term, per_chunk + [st]
            h_loss, met = head(ends, x, b)
            loss, metrics, stats = loss + h_loss, metrics + [met], stats + [per_chunk]
        add = lambda trees: jax.tree.map(lambda *a: sum(a), *trees)  # noqa: E731
        per_chunk = [add([st[c] for st in stats]) for c in range(chunks["w"].shape[0])]
        return loss, (add(metrics), jax.tree.map(lambda *a: jnp.stack(a), *per_chunk))

    (loss, (metrics, stats)), grads = jax.jit(jax.value_and_grad(total, argnums=(0, 1), has_aux=True))(
        chunks, ends
    )
    return loss, metrics, stats, grads


def run_pipeline(name, P, M, fill=float("nan")):
    """Run the executor with NaN-filled buffers (a read of anything not yet written would poison
    the result) and check that the executed op trace equals the table."""
    sched = S.build(name, P, M)
    table = S.lower(sched)
    mesh = jax.make_mesh((P,), ("stage",), devices=jax.devices()[:P], axis_types=(AxisType.Auto,))
    chunks, ends, batch = model(sched.chunks, M)
    step = jax.jit(pipeline_value_and_grad(table, mesh, embed, chunk, head, bubble_fill=fill))
    loss, metrics, stats, (d_stacked, d_ends), trace = step(stack_for_stages(table, chunks), ends, batch)
    np.testing.assert_array_equal(np.asarray(trace), table.table[:, :, S.Field.OP])
    got = (loss, metrics, unstack_from_stages(table, stats), (unstack_from_stages(table, d_stacked), d_ends))
    return table, got, reference(chunks, ends, batch)


def assert_close(got, want):
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6), got, want)


# one case per schedule at its smallest micro-batch count (compiles dominate CI time)
CASES = [(name, 4, 1) for name in S.ScheduleName]


@pytest.mark.parametrize("name,P,k", CASES)
def test_pipelined_loss_and_grads_equal_jax_grad_and_trace_equals_table(name, P, k):
    M = k * P * (2 if name == S.ScheduleName.DUALPIPEV else 1)
    _, got, want = run_pipeline(name, P, M)
    assert_close(got, want)


def _temp_bytes(name, P, M):
    """(compiled temp bytes of the executor, the table's buffer slots per rank)."""
    sched = S.build(name, P, M)
    table = S.lower(sched)
    mesh = jax.make_mesh((P,), ("stage",), devices=jax.devices()[:P], axis_types=(AxisType.Auto,))
    chunks, ends, batch = model(sched.chunks, M)
    step = jax.jit(pipeline_value_and_grad(table, mesh, embed, chunk, head))
    compiled = step.lower(stack_for_stages(table, chunks), ends, batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes, buffer_slots(table)


@pytest.mark.parametrize("name", ["1f1b", "zb-h1", "dualpipev", "gpipe"])
def test_temp_memory_flat_in_microbatches_except_gpipe_as_the_table_predicts(name):
    """From 2P to 4P micro-batches the lowered table's buffers (input and cotangent stash of K
    slots, receive slots: `plan.buffer_slots`) stay the same for 1F1B, ZB-H1 and DualPipeV
    (K = the worst rank's peak live activations, independent of M) and the compiled program's
    temporaries with them; GPipe's K = M grows, and its temporaries by at least the added slots of
    one micro-batch activation [MB, SEQ, D] fp32 each."""
    P = 4
    (small, slots_2p), (large, slots_4p) = _temp_bytes(name, P, 2 * P), _temp_bytes(name, P, 4 * P)
    if name == "gpipe":
        assert slots_4p - slots_2p == 2 * 2 * P  # stash and cotangent stash, 2P more slots each
        assert large - small >= (slots_4p - slots_2p) * MB * SEQ * D * 4
    else:
        assert slots_4p == slots_2p
        assert large == small


@pytest.mark.slow
def test_stage8_1f1b_equals_jax_grad():
    _, got, want = run_pipeline("1f1b", 8, 8)
    assert_close(got, want)


@pytest.mark.slow
def test_stage_axis_composes_with_a_data_axis():
    """mesh stage 2 x data 4: the executor is manual over `stage` only; the micro-batch rows are
    sharded over `data` by the compiler (auto axis) and the result is unchanged."""
    sched = S.build("dualpipev", 2, 4)
    table = S.lower(sched)
    mesh = jax.make_mesh((2, 4), ("stage", "data"), axis_types=(AxisType.Auto,) * 2)
    chunks, ends, batch = model(sched.chunks, 4)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data"))
    batch = jax.tree.map(lambda a: jax.device_put(jnp.tile(a, (1, 2, 1)), rows), batch)  # 4 rows per mb
    step = jax.jit(pipeline_value_and_grad(table, mesh, embed, chunk, head))
    loss, metrics, stats, (d_stacked, d_ends), _ = step(stack_for_stages(table, chunks), ends, batch)
    got = (loss, metrics, unstack_from_stages(table, stats), (unstack_from_stages(table, d_stacked), d_ends))
    assert_close(got, reference(chunks, ends, batch))
