"""MTP layers (HF layer num_hidden_layers + k - 1) import into `model.mtp`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from frontier_jax.convert import from_hf

from .helpers import (LOGIT_RTOL, flat_params, read_config, read_tensors, rel_err,
                      write_checkpoint, write_mtp_checkpoint)


@pytest.fixture(scope="module")
def mtp_checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mtp"))
    source, extras = write_mtp_checkpoint(path)
    return path, source, extras


def _rms(x, w):
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def _torch_reference(source, extras, ids):
    """(main logits, depth-1 MTP logits) of the 2-layer main model + MTP module, composed from
    transformers' modules: h = layers 0-1 (embed(t)); MTP: layer 2 applied to
    eh_proj [enorm(embed(t_{i+1})); hnorm(h)], then shared_head.norm and the head."""
    p = "model.layers.2."
    with torch.no_grad():
        x = torch.tensor(ids)
        t = x.shape[1]
        positions = torch.arange(t)[None]
        mask = torch.full((t, t), float("-inf")).triu(1)[None, None]
        run = lambda layer, h: layer(h, attention_mask=mask, position_ids=positions,
                                     position_embeddings=source.model.rotary_emb(h, positions))
        h = source.model.embed_tokens(x)
        for layer in source.model.layers[:2]:
            h = run(layer, h)
        main = source.lm_head(source.model.norm(h))
        ahead = _rms(source.model.embed_tokens(torch.roll(x, -1, dims=1)), extras[f"{p}enorm.weight"])
        z = torch.cat([ahead, _rms(h, extras[f"{p}hnorm.weight"])], -1) @ extras[f"{p}eh_proj.weight"].T
        z = run(source.model.layers[2], z)
        mtp = _rms(z, extras[f"{p}shared_head.norm.weight"]) @ extras[f"{p}shared_head.head.weight"].T
    return main.numpy(), mtp.numpy()


def test_mtp_layer_lands_in_model_mtp_and_matches_a_torch_reference(mtp_checkpoint, ids):
    path, source, extras = mtp_checkpoint
    cfg, model = from_hf(path)
    assert cfg.num_layers == 2 and cfg.mtp_depth == 1
    params, p = flat_params(model), "model.layers.2."
    mtp = lambda *names: params[("mtp", "modules") + names][0]
    np.testing.assert_array_equal(mtp("emb_norm", "scale"), extras[f"{p}enorm.weight"].numpy())
    np.testing.assert_array_equal(mtp("hidden_norm", "scale"), extras[f"{p}hnorm.weight"].numpy())
    np.testing.assert_array_equal(mtp("proj", "kernel"), extras[f"{p}eh_proj.weight"].numpy().T)
    np.testing.assert_array_equal(mtp("out_norm", "scale"), extras[f"{p}shared_head.norm.weight"].numpy())
    layer2 = source.model.layers[2]
    np.testing.assert_array_equal(mtp("block", "attn_norm", "scale"),
                                  layer2.input_layernorm.weight.detach().numpy())
    np.testing.assert_array_equal(mtp("block", "ffn", "router", "bias"),
                                  layer2.mlp.gate.e_score_correction_bias.numpy())
    np.testing.assert_array_equal(mtp("block", "ffn", "experts", "w_down"),
                                  layer2.mlp.experts.down_proj.detach().numpy().transpose(0, 2, 1))

    graphdef, state = nnx.split(model)
    out = jax.jit(lambda s, x: nnx.merge(graphdef, s).forward(x))(state, jnp.asarray(ids, jnp.int32))
    main_ref, mtp_ref = _torch_reference(source, extras, ids)
    main_err = rel_err(np.asarray(out.logits), main_ref)
    mtp_err = rel_err(np.asarray(out.mtp_logits[0]), mtp_ref)
    print(f"mtp checkpoint: main logits {main_err:.2e}, mtp logits {mtp_err:.2e}")
    assert main_err < LOGIT_RTOL and mtp_err < LOGIT_RTOL


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
