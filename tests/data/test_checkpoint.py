import numpy as np
import orbax.checkpoint as ocp

from frontier_jax.data import DataConfig, build_train_iterator, orbax_restore_args, orbax_save_args


def test_orbax_checkpoint_manager_round_trips_the_iterator_position(tmp_path):
    cfg = DataConfig(max_document_chars=100)
    it = build_train_iterator(cfg, seq_len=32, global_batch=2)
    for _ in range(5):
        next(it)
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.save(5, args=ocp.args.Composite(data=orbax_save_args(it)))
        manager.wait_until_finished()
    expected = next(it)
    resumed = build_train_iterator(cfg, seq_len=32, global_batch=2)
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.restore(5, args=ocp.args.Composite(data=orbax_restore_args(resumed)))
    got = next(resumed)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])
