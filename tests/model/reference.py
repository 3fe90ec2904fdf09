"""Float64 NumPy reference implementations of the model core.

Written from the equations stated in the docstrings of `frontier_jax.model` (DeepSeek-V3 report
notation), deliberately naive: per-token / per-head Python loops, explicit masks, no vectorised
dispatch.  Nothing here imports or mirrors the JAX code; the only shared knowledge is the
parameter layout (names and axis order of the stored weights) and the ModelConfig fields, which
are read as plain numbers.

Parameter trees are nested dicts of float64 arrays as produced by
`nnx.state(module).to_pure_dict()` (see `common.params_f64`).
"""

from __future__ import annotations

import math

import numpy as np

# --------------------------------------------------------------------------- elementwise


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def silu(x):
    x = np.asarray(x, np.float64)
    return x * sigmoid(x)


def softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - np.max(x))
    return e / e.sum()


def rms_norm(x, w, eps):
    """w * x / sqrt(mean(x^2) + eps) over the last axis."""
    x = np.asarray(x, np.float64)
    return np.asarray(w, np.float64) * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def swiglu(x, w_gate, w_up, w_down):
    """FFN(x) = W_down (SiLU(W_gate x) * W_up x), x [..., d] (row-vector convention: x @ W)."""
    return (silu(x @ w_gate) * (x @ w_up)) @ w_down


# --------------------------------------------------------------------------- RoPE / YaRN


def base_frequencies(dim, theta):
    """f_i = theta^(-2i/d_R), i = 0 .. d_R/2 - 1."""
    return np.array([theta ** (-2.0 * i / dim) for i in range(dim // 2)], np.float64)


def yarn_correction_dim(num_rotations, dim, theta, original_len):
    """r(b): the (fractional) dimension index whose wavelength completes b rotations in L0."""
    return dim * math.log(original_len / (2.0 * math.pi * num_rotations)) / (2.0 * math.log(theta))


def yarn_ramp_bounds(dim, theta, original_len, beta_fast, beta_slow):
    lo = math.floor(yarn_correction_dim(beta_fast, dim, theta, original_len))
    hi = math.ceil(yarn_correction_dim(beta_slow, dim, theta, original_len))
    return max(lo, 0), min(hi, dim - 1)


def yarn_frequencies(dim, theta, factor, original_len, beta_fast, beta_slow):
    """f_i' = (f_i / s) gamma_i + f_i (1 - gamma_i), gamma_i = clip((i - lo) / (hi - lo), 0, 1)."""
    f = base_frequencies(dim, theta)
    lo, hi = yarn_ramp_bounds(dim, theta, original_len, beta_fast, beta_slow)
    out = np.empty_like(f)
    for i in range(dim // 2):
        if hi > lo:
            gamma = min(max((i - lo) / (hi - lo), 0.0), 1.0)
        else:  # degenerate ramp: a step between lo and lo + 1
            gamma = 0.0 if i <= lo else 1.0
        out[i] = f[i] / factor * gamma + f[i] * (1.0 - gamma)
    return out


def yarn_m(factor, mu):
    """m(s, mu) = 0.1 mu ln(s) + 1 for s > 1, else 1."""
    return 1.0 if factor <= 1 else 0.1 * mu * math.log(factor) + 1.0


def frequencies_for(cfg):
    rs = cfg.rope_scaling
    if rs.type != "yarn":
        return base_frequencies(cfg.qk_rope_head_dim, cfg.rope_theta)
    return yarn_frequencies(
        cfg.qk_rope_head_dim,
        cfg.rope_theta,
        rs.factor,
        rs.original_max_position_embeddings,
        rs.beta_fast,
        rs.beta_slow,
    )


def amplitude_for(cfg):
    """cos/sin factor: m(s, mscale) / m(s, mscale_all_dim), or m(s, 1) if either is 0."""
    rs = cfg.rope_scaling
    if rs.type != "yarn":
        return 1.0
    if rs.mscale == 0 or rs.mscale_all_dim == 0:
        return yarn_m(rs.factor, 1.0)
    return yarn_m(rs.factor, rs.mscale) / yarn_m(rs.factor, rs.mscale_all_dim)


def softmax_scale_for(cfg):
    """1/sqrt(d_h + d_h^R) times m(s, mscale_all_dim)^2 under YaRN."""
    scale = 1.0 / math.sqrt(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    rs = cfg.rope_scaling
    if rs.type == "yarn" and rs.mscale_all_dim != 0:
        scale *= yarn_m(rs.factor, rs.mscale_all_dim) ** 2
    return scale


def rotate(x, position, freqs, amplitude=1.0):
    """RoPE of one vector x [d_R] at an integer position, half layout: the pair
    (x_a[i], x_b[i]) is the complex number x_a[i] + 1j x_b[i], multiplied by A e^{1j p f_i}."""
    x = np.asarray(x, np.float64)
    half = x.shape[-1] // 2
    z = (x[:half] + 1j * x[half:]) * amplitude * np.exp(1j * float(position) * np.asarray(freqs))
    return np.concatenate([z.real, z.imag])


# --------------------------------------------------------------------------- attention


def may_attend(i, j, q_offset=0, q_seg=None, kv_seg=None):
    """Query i (absolute position i + q_offset) sees key j iff j <= i + q_offset and, with segment
    ids, both are in the same non-padding (id != 0) segment."""
    if j > i + q_offset:
        return False
    if q_seg is not None:
        return bool(q_seg[i] == kv_seg[j] and kv_seg[j] != 0)
    return True


def attention(q, k, v, scale, q_offset=0, q_seg=None, kv_seg=None):
    """q [T, H, D], k [S, H, D], v [S, H, Dv] for one row -> [T, H, Dv].  Fully masked rows give
    NaN (undefined); callers compare only rows that see at least one key."""
    t_len, heads, _ = q.shape
    out = np.full((t_len, heads, v.shape[-1]), np.nan)
    for h in range(heads):
        for i in range(t_len):
            keys = [j for j in range(k.shape[0]) if may_attend(i, j, q_offset, q_seg, kv_seg)]
            if not keys:
                continue
            logits = np.array([scale * np.dot(q[i, h], k[j, h]) for j in keys])
            probs = softmax(logits)
            out[i, h] = sum(p * v[j, h] for p, j in zip(probs, keys))
    return out


def mla(p, x, positions, segment_ids, cfg):
    """MLA self-attention.  p: MLA parameter dict; x [B, T, d]; positions [B, T];
    segment_ids [B, T] or None -> u [B, T, d] (NaN at rows that see no key, i.e. padding)."""
    x = np.asarray(x, np.float64)
    bsz, t_len, _ = x.shape
    heads, dn, dr = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    freqs, amp, scale = frequencies_for(cfg), amplitude_for(cfg), softmax_scale_for(cfg)
    eps = 1e-6  # the latent norms' eps in DeepSeek's code and transformers, not cfg.rms_norm_eps
    out = np.zeros_like(x)
    for b in range(bsz):
        q = np.zeros((t_len, heads, dn + dr))
        k = np.zeros((t_len, heads, dn + dr))
        v = np.zeros((t_len, heads, cfg.v_head_dim))
        for t in range(t_len):
            h_t = x[b, t]
            if cfg.q_lora_rank:
                c_q = rms_norm(h_t @ p["wq_a"]["kernel"], p["q_norm"]["scale"], eps)
                q_t = np.einsum("c,chd->hd", c_q, p["wq_b"]["kernel"])
            else:
                q_t = np.einsum("c,chd->hd", h_t, p["wq"]["kernel"])
            c_kv = rms_norm(h_t @ p["wkv_a"]["kernel"], p["kv_norm"]["scale"], eps)
            k_r = rotate(h_t @ p["wk_rope"]["kernel"], positions[b, t], freqs, amp)
            for h in range(heads):
                q[t, h, :dn] = q_t[h, :dn]
                q[t, h, dn:] = rotate(q_t[h, dn:], positions[b, t], freqs, amp)
                k[t, h, :dn] = c_kv @ p["wk_b"]["kernel"][:, h, :]
                k[t, h, dn:] = k_r
                v[t, h] = c_kv @ p["wv_b"]["kernel"][:, h, :]
        seg = None if segment_ids is None else np.asarray(segment_ids[b])
        o = attention(q, k, v, scale, 0, seg, seg)
        for t in range(t_len):
            out[b, t] = sum(o[t, h] @ p["wo"]["kernel"][h] for h in range(heads))
    return out


# --------------------------------------------------------------------------- routing / MoE


def route_token(logits, bias, cfg, replay=None):
    """One token's routing.  Returns (experts [K] in selection order, gates [K], scores [N_r]);
    replay [K]: the experts to take instead of selecting (routing replay), gated as selected ones."""
    logits = np.asarray(logits, np.float64)
    n_exp, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    scores = sigmoid(logits) if cfg.scoring_func == "sigmoid" else softmax(logits)
    biased = scores + np.asarray(bias, np.float64)
    eligible = list(range(n_exp))
    if cfg.n_group > 1:
        per_group = n_exp // cfg.n_group
        group_score = []
        for g in range(cfg.n_group):
            members = sorted(biased[g * per_group : (g + 1) * per_group], reverse=True)
            group_score.append(members[0] + members[1] if cfg.scoring_func == "sigmoid" else members[0])
        top_groups = sorted(range(cfg.n_group), key=lambda g: -group_score[g])[: cfg.topk_group]
        eligible = [e for e in range(n_exp) if e // per_group in top_groups]
    experts = sorted(eligible, key=lambda e: -biased[e])[:k] if replay is None else [int(e) for e in replay]
    gates = np.array([scores[e] for e in experts])
    if cfg.norm_topk_prob:
        gates = gates / gates.sum()
    return experts, gates * cfg.routed_scaling_factor, scores


def capacity(cfg, n_tokens, capacity_factor):
    return math.ceil(capacity_factor * n_tokens * cfg.num_experts_per_tok / cfg.n_routed_experts)


def moe(p, x, cfg, token_mask=None, capacity_factor=None, replay=None):
    """DeepSeekMoE on flat tokens x [N, d].  Returns dict(y [N, d], dropped, load [N_r],
    experts, gates, scores).  capacity_factor=None: dropless; else each expert keeps its first
    C = ceil(factor N K / N_r) assignments of real tokens (token_mask 1) in token order and
    drops the rest (counted); padding tokens get no routed output and take no place.
    replay [N, K]: each token's experts to replay (`route_token`)."""
    x = np.asarray(x, np.float64)
    n, _ = x.shape
    n_exp = cfg.n_routed_experts
    mask = np.ones(n) if token_mask is None else np.asarray(token_mask, np.float64).reshape(-1)
    cap = None if capacity_factor is None else capacity(cfg, n, capacity_factor)
    taken = [0] * n_exp
    y = np.zeros_like(x)
    load = np.zeros(n_exp)
    dropped = 0
    all_experts, all_gates, all_scores = [], [], []
    ex = p["experts"]
    for t in range(n):
        experts, gates, scores = route_token(
            x[t] @ p["router"]["kernel"], p["router"]["bias"], cfg, None if replay is None else replay[t]
        )
        all_experts.append(experts), all_gates.append(gates), all_scores.append(scores)
        for e, g in zip(experts, gates):
            load[e] += mask[t]
            if cap is not None:
                if not mask[t]:
                    continue
                if taken[e] >= cap:
                    dropped += 1
                    continue
                taken[e] += 1
            y[t] += g * swiglu(x[t], ex["w_gate"][e], ex["w_up"][e], ex["w_down"][e])
        if cfg.n_shared_experts:
            sh = p["shared"]
            y[t] += swiglu(x[t], sh["w_gate"]["kernel"], sh["w_up"]["kernel"], sh["w_down"]["kernel"])
    return dict(
        y=y,
        dropped=dropped,
        load=load,
        experts=np.array(all_experts),
        gates=np.array(all_gates),
        scores=np.array(all_scores),
    )


def sequence_balance_loss(experts, scores, token_mask, cfg):
    """L_bal = sum_i f_i P_i per row, SUMMED over the rows that hold real tokens (training divides
    by the number of such rows in the global batch).  experts [B, T, K], scores [B, T, N_r],
    token_mask [B, T].  With T' >= 1 real tokens of the row:
    f_i = N_r / (K T') sum_t 1[i in TopK_t],  P_i = (1/T') sum_t s_{i,t} / sum_j s_{j,t}."""
    bsz, t_len = token_mask.shape
    n_exp, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    losses = []
    for b in range(bsz):
        real = [t for t in range(t_len) if token_mask[b, t]]
        if not real:
            continue
        t_real = len(real)
        total = 0.0
        for i in range(n_exp):
            f_i = n_exp / (k * t_real) * sum(1.0 for t in real if i in list(experts[b, t]))
            p_i = sum(scores[b, t, i] / scores[b, t].sum() for t in real) / t_real
            total += f_i * p_i
        losses.append(total)
    return float(np.sum(losses))


# --------------------------------------------------------------------------- blocks / model


def layer(tree, index):
    """Parameters of layer `index` from a tree whose leaves carry a leading [L] axis."""
    if isinstance(tree, dict):
        return {key: layer(value, index) for key, value in tree.items()}
    return tree[index]


def block(p, x, positions, segment_ids, cfg, moe_ffn, replay=None):
    """Pre-norm block: h = x + MLA(RMSNorm(x)); y = h + FFN(RMSNorm(h)).  x [B, T, d]; replay
    [B, T, K]: the experts an MoE block replays."""
    bsz, t_len, d = x.shape
    eps = cfg.rms_norm_eps
    h = x + mla(p["attn"], rms_norm(x, p["attn_norm"]["scale"], eps), positions, segment_ids, cfg)
    hn = rms_norm(h, p["ffn_norm"]["scale"], eps)
    if not moe_ffn:
        f = p["ffn"]
        return h + swiglu(hn, f["w_gate"]["kernel"], f["w_up"]["kernel"], f["w_down"]["kernel"]), None
    mask = np.ones((bsz, t_len)) if segment_ids is None else (np.asarray(segment_ids) != 0)
    flat = np.nan_to_num(hn.reshape(bsz * t_len, d))  # padding rows may be NaN; they never matter
    r = moe(
        p["ffn"],
        flat,
        cfg,
        token_mask=mask,
        replay=None if replay is None else replay.reshape(bsz * t_len, -1),
    )
    stats = dict(
        experts=r["experts"].reshape(bsz, t_len, -1),
        load=r["load"],
        balance_loss=sequence_balance_loss(
            r["experts"].reshape(bsz, t_len, -1), r["scores"].reshape(bsz, t_len, -1), mask, cfg
        ),
    )
    return h + r["y"].reshape(bsz, t_len, d), stats


def head(params, h, cfg):
    if cfg.tie_embeddings:
        return h @ params["embed"]["embedding"].T
    return h @ params["head"]["kernel"]


def trunk(params, ids, cfg, positions, segment_ids, routed_experts=None):
    """Embedding and blocks: (h [B, T, d] before the final norm, moe_stats list per MoE layer);
    routed_experts [B, T, L_moe, K]: the experts MoE layer l replays ([:, :, l])."""
    h = params["embed"]["embedding"][np.asarray(ids)]
    for index in range(cfg.first_k_dense):
        h, _ = block(layer(params["dense_layers"]["blocks"], index), h, positions, segment_ids, cfg, False)
    moe_stats = []
    for index in range(cfg.num_layers - cfg.first_k_dense):
        replay = None if routed_experts is None else np.asarray(routed_experts)[:, :, index]
        h, st = block(
            layer(params["moe_layers"]["blocks"], index), h, positions, segment_ids, cfg, True, replay
        )
        moe_stats.append(st)
    return h, moe_stats


def segment_values(params, ids, cfg, positions, segment_ids, segments):
    """A scalar-head model's value of each segment s = 1..S of each row, read at its last token
    t_s = max{t : segment_ids[t] = s}: RMSNorm(h)[t_s] . w  -> (values [B, S], present [B, S])."""
    h, _ = trunk(params, ids, cfg, positions, segment_ids)
    g = rms_norm(h, params["final_norm"]["scale"], cfg.rms_norm_eps)
    w = params["score"]["kernel"][:, 0]
    seg = np.asarray(segment_ids)
    values, present = np.zeros((len(seg), segments)), np.zeros((len(seg), segments), bool)
    for b in range(len(seg)):
        for s in range(1, segments + 1):
            where = np.flatnonzero(seg[b] == s)
            if len(where):
                values[b, s - 1], present[b, s - 1] = g[b, where[-1]] @ w, True
    return values, present


def transformer(params, ids, cfg, positions=None, segment_ids=None, routed_experts=None):
    """Full model.  Returns dict(logits [B, T, V], mtp_logits [D, B, T, V] or None,
    hidden (pre-final-norm), moe_stats list per MoE layer, mtp_stats list per depth).
    MTP depth 1 reads the final-normed hidden state, depth k > 1 depth k-1's normed output.
    routed_experts [B, T, L_moe, K]: routing replay in the main model's MoE layers (`trunk`)."""
    ids = np.asarray(ids)
    bsz, t_len = ids.shape
    if positions is None:
        positions = np.tile(np.arange(t_len), (bsz, 1))
    emb = params["embed"]["embedding"]
    h, moe_stats = trunk(params, ids, cfg, positions, segment_ids, routed_experts)
    eps = cfg.rms_norm_eps
    normed = rms_norm(h, params["final_norm"]["scale"], eps)
    logits = head(params, normed, cfg)
    mtp_logits, mtp_stats = None, []
    if cfg.mtp_depth:
        mtp_logits = []
        for k in range(1, cfg.mtp_depth + 1):
            m = layer(params["mtp"]["modules"], k - 1)
            ahead = np.array([[ids[b, (t + k) % t_len] for t in range(t_len)] for b in range(bsz)])
            normed, st = mtp_module(m, normed, emb[ahead], positions, segment_ids, cfg)
            mtp_logits.append(head(params, normed, cfg))
            mtp_stats.append(st)
        mtp_logits = np.stack(mtp_logits)
    return dict(logits=logits, mtp_logits=mtp_logits, hidden=h, moe_stats=moe_stats, mtp_stats=mtp_stats)


def mtp_module(m, h_prev, emb_ahead, positions, segment_ids, cfg):
    """One MTP depth: h' = M [RMSNorm(Emb(t_{i+k})) ; RMSNorm(g^{k-1})], h^k = TRM(h'),
    returns (g^k = RMSNorm_k(h^k), stats)."""
    eps = cfg.rms_norm_eps
    cat = np.concatenate(
        [
            rms_norm(emb_ahead, m["emb_norm"]["scale"], eps),
            rms_norm(np.nan_to_num(h_prev), m["hidden_norm"]["scale"], eps),
        ],
        axis=-1,
    )
    h, st = block(m["block"], cat @ m["proj"]["kernel"], positions, segment_ids, cfg, True)
    return rms_norm(h, m["out_norm"]["scale"], eps), st
