"""MTP layers (HF layer num_hidden_layers + k - 1) import into `model.mtp` and reproduce
transformers' own MTP implementation (`transformers.modeling_layers.MtpModel`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import DeepseekV3ForCausalLM
from transformers.modeling_layers import MtpModel

from frontier_jax.convert import from_hf

from .helpers import (
    LOGIT_RTOL,
    flat_params,
    read_config,
    read_tensors,
    rel_err,
    write_checkpoint,
    write_mtp_checkpoint,
)

# (MTP depth, rms_norm_eps): eps 1e-5 (Moonlight's) checks that the MTP norms take rms_norm_eps
# while the latent norms keep 1e-6
MTP_CASES = {"depth_1": (1, 1e-6), "depth_2_eps_1e-5": (2, 1e-5)}


@pytest.fixture(scope="module", params=list(MTP_CASES))
def mtp_checkpoint(request, tmp_path_factory):
    depth, eps = MTP_CASES[request.param]
    path = str(tmp_path_factory.mktemp("mtp"))
    source, extras = write_mtp_checkpoint(path, depth=depth, rms_norm_eps=eps)
    return path, source, extras


def _transformers_mtp_logits(path, ids, depth):
    """(main logits [B, T, V], [depth k logits [B, T - k, V] for k = 1..depth]) from transformers'
    own MTP: the 2-layer main model loaded from the checkpoint and `MtpModel.from_pretrained`
    (what `generate(use_mtp=True)` builds), run one depth at a time with `forward_layer` as
    HF's drafting loop does, on ground-truth tokens: depth k at position i (i < T - k) reads
    Emb(t_{i+k}) at position i + k and depth k-1's output (k = 1: the main model's last
    `hidden_states`, which transformers ties to the final-normed `last_hidden_state`)."""
    main = DeepseekV3ForCausalLM.from_pretrained(path).eval()
    # MtpModel finds the MTP tensors through the main model's ignore patterns, which name
    # V3's layer 61 only: point them at this checkpoint's MTP layers
    main._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{2 + k}\..*" for k in range(depth)]
    mtp = MtpModel.from_pretrained(main).eval()
    x = torch.tensor(ids)
    b, t = x.shape
    with torch.no_grad():
        out = main(x, output_hidden_states=True)
        hidden, mtp_logits = out.hidden_states[-1], []
        for k in range(1, depth + 1):
            positions = torch.arange(k, t)[None].expand(b, -1)
            hidden = mtp.forward_layer(k - 1, hidden[:, : t - k], positions, None, input_ids=x[:, k:])
            mtp_logits.append(mtp._project_to_logits(hidden).numpy())
    return out.logits.numpy(), mtp_logits


def test_mtp_layers_land_in_model_mtp_and_match_transformers_mtp_model(mtp_checkpoint, ids):
    path, source, extras = mtp_checkpoint
    cfg, model = from_hf(path)
    depth = read_config(path)["num_nextn_predict_layers"]
    assert cfg.num_layers == 2 and cfg.mtp_depth == depth
    params = flat_params(model)
    for k in range(depth):
        p, layer = f"model.layers.{2 + k}.", source.model.layers[2 + k]
        mtp = lambda *names, k=k: params[("mtp", "modules") + names][k]
        np.testing.assert_array_equal(mtp("emb_norm", "scale"), extras[f"{p}enorm.weight"].numpy())
        np.testing.assert_array_equal(mtp("hidden_norm", "scale"), extras[f"{p}hnorm.weight"].numpy())
        np.testing.assert_array_equal(mtp("proj", "kernel"), extras[f"{p}eh_proj.weight"].numpy().T)
        np.testing.assert_array_equal(mtp("out_norm", "scale"), extras[f"{p}shared_head.norm.weight"].numpy())
        np.testing.assert_array_equal(
            mtp("block", "attn_norm", "scale"), layer.input_layernorm.weight.detach().numpy()
        )
        np.testing.assert_array_equal(
            mtp("block", "ffn", "router", "bias"), layer.mlp.gate.e_score_correction_bias.numpy()
        )
        np.testing.assert_array_equal(
            mtp("block", "ffn", "experts", "w_down"),
            layer.mlp.experts.down_proj.detach().numpy().transpose(0, 2, 1),
        )

    graphdef, state = nnx.split(model)
    out = jax.jit(lambda s, x: nnx.merge(graphdef, s).forward(x))(state, jnp.asarray(ids, jnp.int32))
    main_ref, mtp_ref = _transformers_mtp_logits(path, ids, depth)
    main_err = rel_err(np.asarray(out.logits), main_ref)
    mtp_errs = [
        rel_err(np.asarray(out.mtp_logits[k - 1, :, : ids.shape[1] - k]), mtp_ref[k - 1])
        for k in range(1, depth + 1)
    ]
    print(
        f"mtp checkpoint: main logits {main_err:.2e}, mtp logits per depth "
        + ", ".join(f"{e:.2e}" for e in mtp_errs)
    )
    assert main_err < LOGIT_RTOL and max(mtp_errs) < LOGIT_RTOL


def test_num_nextn_predict_layers_without_mtp_tensors_imports_with_mtp_depth_0(saved_tiny):
    path, _ = saved_tiny
    assert read_config(path)["num_nextn_predict_layers"] == 1  # what save_pretrained writes
    cfg, model = from_hf(path)
    assert cfg.mtp_depth == 0 and model.mtp is None


def test_config_override_mtp_depth_0_skips_the_mtp_layer(mtp_checkpoint):
    cfg, model = from_hf(mtp_checkpoint[0], config_overrides={"mtp_depth": 0})
    assert cfg.mtp_depth == 0 and model.mtp is None


def test_mtp_embedding_copy_that_differs_from_the_main_embedding_is_rejected(mtp_checkpoint, tmp_path):
    path = mtp_checkpoint[0]
    tensors = read_tensors(path)
    tensors["model.layers.2.embed_tokens.weight"] = tensors["model.layers.2.embed_tokens.weight"] + 1
    write_checkpoint(str(tmp_path), tensors, read_config(path))
    with pytest.raises(ValueError, match=r"model\.layers\.2\.embed_tokens\.weight.*copy"):
        from_hf(str(tmp_path))
