"""SwiGLU feed-forward network: FFN(x) = W_down (SiLU(W_gate x) * W_up x).

x [..., d] -> [..., d] with hidden width f.  Used for the dense prefix layers and, with width
N_s * f_moe, as DeepSeekMoE's shared experts."""

from __future__ import annotations

import jax
from flax import nnx

from frontier_jax.model.layers import Linear, project_jointly
from frontier_jax.precision import PrecisionPolicy


class SwiGLU(nnx.Module):
    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        std: float,
        policy: PrecisionPolicy,
        rngs: nnx.Rngs,
        name: str = "mlp",
        hidden_axis: str = "mlp",
    ):
        lin = dict(std=std, policy=policy, rngs=rngs)
        self.w_gate = Linear((dim,), (hidden,), ("embed", hidden_axis), name=f"{name}.w_gate", **lin)
        self.w_up = Linear((dim,), (hidden,), ("embed", hidden_axis), name=f"{name}.w_up", **lin)
        self.w_down = Linear((hidden,), (dim,), (hidden_axis, "embed"), name=f"{name}.w_down", **lin)

    def __call__(self, x: jax.Array) -> jax.Array:
        """W_gate x and W_up x run as one projection (`project_jointly`)."""
        gate, up = project_jointly(x, [self.w_gate, self.w_up])
        return self.w_down(jax.nn.silu(gate) * up)
