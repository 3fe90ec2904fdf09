"""Multi-token prediction: MTP logits against the float64 reference (depth 1 and 2) and the
dependency structure (depth k at position i sees tokens up to i + k, never beyond)."""

import jax.numpy as jnp
import numpy as np

from . import common
from . import reference as ref


def test_mtp_logits_match_reference(any_model):
    # depth 1 (1 dense + 2 MoE, untied) and depth 2 (2 MoE, tied): fp32 vs float64,
    # rtol 1e-4, atol 5e-5 on O(5) logits; per-depth MoE statistics of the MTP blocks as well
    cfg, model = any_model
    ids = common.token_ids(cfg, 1)
    out = common.forward(model, jnp.asarray(ids))
    want = ref.transformer(common.params_f64(model), ids, cfg)
    assert out.mtp_logits.shape == (cfg.mtp_depth, common.B, common.T, cfg.vocab_size)
    common.assert_close(out.mtp_logits, want["mtp_logits"], rtol=1e-4, atol=5e-5)
    np.testing.assert_array_equal(
        np.asarray(out.mtp_stats.load), np.stack([s["load"] for s in want["mtp_stats"]])
    )
    np.testing.assert_allclose(
        np.asarray(out.mtp_stats.balance_loss), [s["balance_loss"] for s in want["mtp_stats"]], rtol=1e-5
    )


def test_mtp_depth_k_sees_tokens_up_to_i_plus_k(moe_only_tied_model):
    # change token j = 5: main logits (next-token) change from position 5 on, MTP depth k logits
    # change from position 5 - k on (its embedding input t_{i+k}) and not before (atol 1e-5)
    cfg, model = moe_only_tied_model
    ids = common.token_ids(cfg, 2)
    ids2 = ids.copy()
    ids2[:, 5] = (ids2[:, 5] + 7) % cfg.vocab_size
    a = common.forward(model, jnp.asarray(ids))
    b = common.forward(model, jnp.asarray(ids2))
    la, lb = np.asarray(a.logits), np.asarray(b.logits)
    np.testing.assert_allclose(lb[:, :5], la[:, :5], rtol=0, atol=1e-5)
    assert (np.abs(lb[:, 5] - la[:, 5]).max(-1) > 1e-3).all()
    for k in range(1, cfg.mtp_depth + 1):
        ma, mb = np.asarray(a.mtp_logits[k - 1]), np.asarray(b.mtp_logits[k - 1])
        np.testing.assert_allclose(mb[:, : 5 - k], ma[:, : 5 - k], rtol=0, atol=1e-5)
        assert (np.abs(mb[:, 5 - k] - ma[:, 5 - k]).max(-1) > 1e-3).all()


def test_mtp_depth_1_reads_the_final_normed_hidden_state_and_depth_2_the_normed_depth_1_output(
    moe_only_tied_model,
):
    # feeding the reference the other plausible inputs (the pre-final-norm h^L at depth 1; depth
    # 1's un-normed block output at depth 2) changes the MTP logits by > 1e-3, so the agreement
    # of the model with the reference (fp32 vs float64, rtol 1e-4, atol 5e-5) pins the choice
    cfg, model = moe_only_tied_model
    ids = common.token_ids(cfg, 1)
    params = common.params_f64(model)
    want = ref.transformer(params, ids, cfg)
    positions = np.tile(np.arange(common.T), (common.B, 1))
    emb = lambda k: params["embed"]["embedding"][np.roll(ids, -k, axis=1)]
    depth = lambda k: ref.layer(params["mtp"]["modules"], k - 1)
    pre_norm, _ = ref.mtp_module(depth(1), want["hidden"], emb(1), positions, None, cfg)
    assert np.abs(ref.head(params, pre_norm, cfg) - want["mtp_logits"][0]).max() > 1e-3
    eps, m1 = cfg.rms_norm_eps, depth(1)
    normed0 = ref.rms_norm(want["hidden"], params["final_norm"]["scale"], eps)
    cat = np.concatenate(
        [
            ref.rms_norm(emb(1), m1["emb_norm"]["scale"], eps),
            ref.rms_norm(normed0, m1["hidden_norm"]["scale"], eps),
        ],
        axis=-1,
    )
    h1, _ = ref.block(m1["block"], cat @ m1["proj"]["kernel"], positions, None, cfg, True)
    un_normed, _ = ref.mtp_module(depth(2), h1, emb(2), positions, None, cfg)
    assert np.abs(ref.head(params, un_normed, cfg) - want["mtp_logits"][1]).max() > 1e-3
    out = common.forward(model, jnp.asarray(ids))
    common.assert_close(out.mtp_logits, want["mtp_logits"], rtol=1e-4, atol=5e-5)
