"""`to_hf` writes the released layout back: exact round trips, and transformers reloads it."""

import json
import os

import numpy as np
import pytest
from transformers import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM

from frontier_jax.convert import from_hf, to_hf
from frontier_jax.convert.safetensors_io import INDEX_FILE, CheckpointReader

from .helpers import (
    YARN,
    assert_same_params,
    hf_logits,
    read_tensors,
    rel_err,
    tiny_hf_model,
    write_mtp_checkpoint,
)


def test_round_trip_reproduces_every_tensor_of_the_checkpoint_and_every_parameter(tmp_path):
    """MTP checkpoint (interleaved rope, YaRN off) -> import -> sharded export: the same tensor
    names and values as the original; re-import gives identical parameters."""
    original = str(tmp_path / "original")
    write_mtp_checkpoint(original)
    _, model = from_hf(original)
    exported = str(tmp_path / "exported")
    to_hf(model, exported, max_shard_bytes=16 * 1024)
    assert os.path.exists(os.path.join(exported, INDEX_FILE))
    reference = read_tensors(original)
    ours = CheckpointReader(exported)
    assert ours.names() == set(reference)
    for name, tensor in reference.items():
        np.testing.assert_array_equal(ours.read(name), tensor.numpy(), err_msg=name)
    assert_same_params(from_hf(exported)[1], model)


@pytest.mark.parametrize("interleave", [True, False])
def test_transformers_reloads_our_export_with_the_same_logits(interleave, tmp_path, ids):
    hf = tiny_hf_model(rope_interleave=interleave, rope_parameters={**YARN, "mscale": 0.707})
    hf.save_pretrained(tmp_path / "original")
    _, model = from_hf(str(tmp_path / "original"))
    to_hf(model, str(tmp_path / "exported"))
    reloaded = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "exported").eval()
    assert reloaded.config.rope_interleave  # exported in the released (interleaved) layout
    err = rel_err(hf_logits(reloaded, ids), hf_logits(hf, ids))
    print(f"export, source rope_interleave={interleave}: max relative logit error {err:.2e}")
    assert err < 1e-5


def test_softmax_routed_model_exports_as_deepseek_v2_that_transformers_reloads(tmp_path, ids):
    hf = tiny_hf_model(model_type="deepseek_v2", topk_method="group_limited_greedy", norm_topk_prob=False)
    hf.save_pretrained(tmp_path / "original")
    _, model = from_hf(str(tmp_path / "original"))
    to_hf(model, str(tmp_path / "exported"))
    reloaded = DeepseekV2ForCausalLM.from_pretrained(tmp_path / "exported").eval()
    assert reloaded.config.topk_method == "group_limited_greedy"
    assert rel_err(hf_logits(reloaded, ids), hf_logits(hf, ids)) < 1e-5


def test_bfloat16_export_stores_bfloat16_with_a_float32_routing_bias(saved_tiny, tmp_path):
    _, model = from_hf(saved_tiny[0])
    to_hf(model, str(tmp_path), dtype="bfloat16")
    with open(tmp_path / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    dtypes = {name: info["dtype"] for name, info in header.items() if name != "__metadata__"}
    assert {d for n, d in dtypes.items() if n.endswith("e_score_correction_bias")} == {"F32"}
    assert {d for n, d in dtypes.items() if not n.endswith("e_score_correction_bias")} == {"BF16"}
    reloaded = DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == model.cfg.num_layers


def test_export_refuses_a_directory_that_already_holds_a_checkpoint(saved_tiny):
    _, model = from_hf(saved_tiny[0])
    with pytest.raises(FileExistsError, match="already holds"):
        to_hf(model, saved_tiny[0])
