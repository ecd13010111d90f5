"""DeepSeek-V3's multi-head latent attention on ``leanattn.mla_decode`` in decode steps.

transformers' ``DeepseekV3Attention`` caches the latent of each token (the normed
``kv_lora_rank`` values, as the layer's keys) and its roped key (``qk_rope_head_dim`` values, as
its values), then expands both to per-head K and V with ``kv_b_proj`` before the attention
function, so that function never sees the latent cache. For models whose ``attn_implementation``
is a leanattn name, ``install`` gives the class a forward that does what the original does up to
the cache update, then, for decode steps, absorbs ``kv_b_proj`` into the query and the output
(DeepSeek-V2's inference form):

    q_latent[h] = q_nope[h] . W_UK[h]           (batch, q_len, heads, kv_lora_rank)
    o_latent    = mla_decode([q_latent, q_rope], latent cache, rope_cache=roped-key cache)
    out[h]      = o_latent[h] . W_UV[h]^T        (batch, q_len, heads, v_head_dim)

reading the cache in place (no expansion, no copy). Other calls (prefills, fp32, autograd, no
cache, a ``kv_b_proj`` that is not a plain ``nn.Linear``: quantized or adapted, whose ``.weight``
is not the weight it applies) take the original's expanded path to ``sdpa_attention_forward``,
unchanged. Masks are read as in ``attention_forward``: each sequence's first and last live key on
the device, and a NaN query for a sequence whose mask the kernel can't express.
"""

from __future__ import annotations

import sys

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import leanattn
from leanattn._checks import MLA_MAX_HEAD_DIM, MLA_MAX_Q_LEN
from leanattn.kernels.config import interpreting

__all__ = ["install", "mla_refusal"]

PATH = "leanattn mla"  # the ``calls`` counter's key for decode steps taken by mla_decode
_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def mla_refusal(module: torch.nn.Module, hidden_states: torch.Tensor, past_key_values, kwargs: dict) -> str | None:
    """Why this DeepSeek attention call can't run on ``mla_decode`` (a short reason), or None.
    hidden_states (batch, q_len, hidden). Decided from shapes, dtypes and Python values only."""
    q_len = hidden_states.shape[1]
    if past_key_values is None:
        return "no cache"
    if not 1 <= q_len <= MLA_MAX_Q_LEN:
        return "prefill"
    if module.training and module.attention_dropout:
        return "dropout"
    if torch.is_grad_enabled() and (hidden_states.requires_grad or any(p.requires_grad for p in module.parameters())):
        return "autograd"  # the kernel has no backward; the expanded path has
    if type(module.kv_b_proj) is not torch.nn.Linear or module.kv_b_proj.weight.dtype not in _WEIGHT_DTYPES:
        # Absorbing needs kv_b_proj's effective weight; a quantized (FP8Linear) or adapted
        # (LoRA) projection's .weight is not it.
        return f"kv_b_proj is a {type(module.kv_b_proj).__name__} of {module.kv_b_proj.weight.dtype}"
    if hidden_states.dtype not in leanattn.SUPPORTED_DTYPES:
        return f"{hidden_states.dtype}: the kernel takes float16 and bfloat16"
    if hidden_states.device.type != "cuda" and not interpreting():
        return f"tensors on {hidden_states.device.type}"
    width = module.kv_lora_rank + module.qk_rope_head_dim
    if module.kv_lora_rank % 16 or width % 16 or width > MLA_MAX_HEAD_DIM or module.qk_rope_head_dim == 0:
        return f"latent {module.kv_lora_rank} + rope {module.qk_rope_head_dim}: the kernel takes multiples of 16"
    if kwargs.get("output_attentions"):
        return "output_attentions"
    if kwargs.get("cache") is not None:
        return "paged cache"
    return None


def install(names: dict, lengths, mask_refusal, count) -> None:
    """Give ``DeepseekV3Attention`` the forward above for models whose ``attn_implementation``
    is in ``names`` (name -> its ``Invariance``); ``lengths``, ``mask_refusal`` and ``count`` are
    the integration's mask reader, its check of a mask's form and its call counter. Idempotent."""
    try:
        from transformers.models.deepseek_v3 import modeling_deepseek_v3 as deepseek
    except ImportError:  # a transformers without DeepSeek-V3: nothing to route
        return
    cls = deepseek.DeepseekV3Attention
    if getattr(cls.forward, "_leanattn", False):
        return
    original = cls.forward

    def forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None, **kwargs):
        invariant = names.get(getattr(self.config, "_attn_implementation", None))
        if invariant is None or mla_refusal(self, hidden_states, past_key_values, kwargs) is not None:
            return original(self, hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)
        return _absorbed(self, hidden_states, position_embeddings, attention_mask, past_key_values, invariant,
                         lengths, mask_refusal, count, kwargs)

    forward._leanattn = True
    forward.__doc__ = original.__doc__
    cls.forward = forward


def _absorbed(self, hidden_states, position_embeddings, attention_mask, past_key_values, invariant, lengths,
              mask_refusal, count, kwargs):
    """A decode step of ``DeepseekV3Attention``: its projections, rope and cache update as in
    transformers, then ``mla_decode`` on the latent cache. Returns (output, None)."""
    module = sys.modules[type(self).__module__]
    batch, q_len = hidden_states.shape[:-1]
    nope, rope, rank, heads = self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank, self.num_heads
    if self.q_lora_rank is None:
        q_states = self.q_proj(hidden_states)
    else:
        q_states = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
    q_states = q_states.view(batch, q_len, -1, self.qk_head_dim).transpose(1, 2)
    q_pass, q_rot = torch.split(q_states, [nope, rope], dim=-1)
    compressed_kv = self.kv_a_proj_with_mqa(hidden_states)
    kv_nope, k_rot = torch.split(compressed_kv, [rank, rope], dim=-1)
    kv_nope = self.kv_a_layernorm(kv_nope).view(batch, 1, q_len, rank)
    k_rot = k_rot.view(batch, 1, q_len, rope)
    cos, sin = position_embeddings
    rotate = module.apply_rotary_pos_emb_interleave if self.config.rope_interleave else module.apply_rotary_pos_emb
    q_rot, k_rot = rotate(q_rot, k_rot, cos, sin)
    kv_nope, k_rot = past_key_values.update(kv_nope, k_rot, self.layer_idx)  # (batch, 1, kv_len, rank / rope)
    reason = mask_refusal(attention_mask, batch, q_len, kv_nope.shape[2])
    if reason is not None:  # the original's expanded path, from the updated cache
        count(f"sdpa: {reason}")
        key_states, value_states = self.expand_kv(kv_nope, k_rot)
        out, weights = sdpa_attention_forward(self, torch.cat((q_pass, q_rot), dim=-1), key_states, value_states,
                                              attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(batch, q_len, -1).contiguous()), weights
    count(PATH)
    # Views of kv_b_proj's weight, per head: (heads, nope, rank) and (heads, v, rank). The
    # products run in the weight's dtype, accumulating in float32 as kv_b_proj's own does; a
    # float32 copy of the weight would cost more than the step's attention.
    weight = self.kv_b_proj.weight.view(heads, nope + self.v_head_dim, rank)
    w_uk, w_uv = weight[:, :nope], weight[:, nope:]
    q_latent = torch.einsum("bhsn,hnr->bshr", q_pass.to(weight.dtype), w_uk).to(q_pass.dtype)
    q = torch.cat((q_latent, q_rot.transpose(1, 2)), dim=-1)  # (batch, q_len, heads, rank + rope)
    leftpad, seqlens, poison = lengths(attention_mask, batch, q_len, -1, q.dtype, q.device)
    if poison is not None:
        q = q * poison  # (batch, 1, 1, 1): a sequence the kernel can't express gets NaN rows, as in decode steps
    o_latent = leanattn.mla_decode(q, kv_nope.transpose(1, 2), seqlens, rope_cache=k_rot.transpose(1, 2),
                                   cache_leftpad=leftpad, head_dim_v=rank, softmax_scale=self.scaling,
                                   **invariant.kwargs)
    out = torch.einsum("bshr,hvr->bshv", o_latent.to(weight.dtype), w_uv).to(hidden_states.dtype)
    return self.o_proj(out.reshape(batch, q_len, heads * self.v_head_dim)), None
