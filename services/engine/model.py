"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2) over a paged KV pool.

Contract: `LlamaModel(config, weights)` takes Hugging Face-named tensors (as the loaders give
them) and packs them for inference: q/k/v fused into one matrix, gate/up into another. The
weights dict is consumed (emptied) so no second copy stays alive. `forward` runs the flat tokens
of a whole batch (prefill chunks and decodes mixed) and returns their final hidden states;
attention, and every read or write of the KV pool, goes through the `AttentionBackend`.
`compute_logits` projects only the rows the caller samples from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from services.engine.attention import AttentionBackend
from services.engine.config import ModelConfig
from services.engine.kv_pool import KVPool
from services.engine.rope import RotaryEmbedding


@dataclass(slots=True)
class _Layer:
    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [(num_heads + 2 * num_kv_heads) * head_dim, hidden]
    qkv_bias: torch.Tensor | None  # [(num_heads + 2 * num_kv_heads) * head_dim]
    q_norm: torch.Tensor | None  # [head_dim]
    k_norm: torch.Tensor | None  # [head_dim]
    o: torch.Tensor  # [hidden, num_heads * head_dim]
    o_bias: torch.Tensor | None  # [hidden] (attention_bias on Llama/Mistral/Qwen3, not Qwen2)
    post_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor  # [hidden, intermediate]


class LlamaModel:
    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor],
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype

        def take(name: str) -> torch.Tensor:
            return weights.pop(name).to(device=self.device, dtype=dtype).contiguous()

        self.embed = take("model.embed_tokens.weight")  # [vocab, hidden]
        self.layers = [self._take_layer(i, take, weights) for i in range(config.num_layers)]
        self.final_norm = take("model.norm.weight")
        if config.tie_word_embeddings or "lm_head.weight" not in weights:
            self.lm_head = self.embed
        else:
            self.lm_head = take("lm_head.weight")  # [vocab, hidden]
        weights.clear()
        self.rope = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta,
            config.rope_scaling, self.device, dtype,
        )
        h, kvh, d = config.num_heads, config.num_kv_heads, config.head_dim
        self._qkv_split = [h * d, kvh * d, kvh * d]

    def _take_layer(self, i: int, take: Any, weights: dict[str, torch.Tensor]) -> _Layer:
        p = f"model.layers.{i}."
        attn = p + "self_attn."
        qkv = torch.cat([take(attn + "q_proj.weight"), take(attn + "k_proj.weight"),
                         take(attn + "v_proj.weight")])
        bias = None
        if self.config.attention_bias:
            bias = torch.cat([take(attn + "q_proj.bias"), take(attn + "k_proj.bias"),
                              take(attn + "v_proj.bias")])
        q_norm = k_norm = None
        if self.config.qk_norm:
            q_norm, k_norm = take(attn + "q_norm.weight"), take(attn + "k_norm.weight")
        mlp = p + "mlp."
        return _Layer(
            input_norm=take(p + "input_layernorm.weight"),
            qkv=qkv, qkv_bias=bias, q_norm=q_norm, k_norm=k_norm,
            o=take(attn + "o_proj.weight"),
            o_bias=take(attn + "o_proj.bias") if attn + "o_proj.bias" in weights else None,
            post_norm=take(p + "post_attention_layernorm.weight"),
            gate_up=torch.cat([take(mlp + "gate_proj.weight"), take(mlp + "up_proj.weight")]),
            down=take(mlp + "down_proj.weight"),
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attention: AttentionBackend, pool: KVPool, meta: Any) -> torch.Tensor:
        """input_ids, positions: [num_tokens] -> hidden states [num_tokens, hidden]."""
        cfg = self.config
        eps = cfg.rms_norm_eps
        num_tokens = input_ids.shape[0]
        hidden = self.embed[input_ids]  # [num_tokens, hidden]
        cos, sin = self.rope.cos_sin(positions)  # [num_tokens, 1, head_dim]
        norm_shape = (cfg.hidden_size,)
        head_shape = (cfg.head_dim,)
        for i, layer in enumerate(self.layers):
            x = F.rms_norm(hidden, norm_shape, layer.input_norm, eps)
            qkv = F.linear(x, layer.qkv, layer.qkv_bias)
            q, k, v = qkv.split(self._qkv_split, dim=-1)
            q = q.view(num_tokens, cfg.num_heads, cfg.head_dim)
            k = k.view(num_tokens, cfg.num_kv_heads, cfg.head_dim)
            v = v.view(num_tokens, cfg.num_kv_heads, cfg.head_dim)
            if layer.q_norm is not None:
                q = F.rms_norm(q, head_shape, layer.q_norm, eps)
                k = F.rms_norm(k, head_shape, layer.k_norm, eps)
            q = self.rope.apply(q, cos, sin)
            k = self.rope.apply(k, cos, sin)
            attn_out = attention.forward(i, q, k, v, pool, meta)  # [num_tokens, heads * dim]
            hidden = hidden + F.linear(attn_out, layer.o, layer.o_bias)
            x = F.rms_norm(hidden, norm_shape, layer.post_norm, eps)
            gate, up = F.linear(x, layer.gate_up).chunk(2, dim=-1)
            hidden = hidden + F.linear(F.silu(gate) * up, layer.down)
        return F.rms_norm(hidden, norm_shape, self.final_norm, eps)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[num_rows, hidden] -> float32 logits [num_rows, vocab]."""
        return F.linear(hidden, self.lm_head).float()
