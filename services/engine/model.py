"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2) over a paged KV pool.

Contract: `LlamaModel(config, weights)` takes Hugging Face-named tensors (as the loaders give
them) and packs them for inference: q/k/v fused into one matrix, gate/up into another. The
weights dict is consumed (emptied) so no second copy stays alive. `forward` runs the flat tokens
of a whole batch (prefill chunks and decodes mixed) and returns their final hidden states;
attention, and every read or write of the KV pool, goes through the `AttentionBackend`.
`compute_logits` projects only the rows the caller samples from.

The element-wise steps (residual add + RMSNorm, rotary embeddings, SiLU-and-multiply) run as
torch operations (the reference, and the CPU path) or, with `fused` (default: on CUDA), as the
fused Triton kernels of `triton_ops.py`: same math, fewer launches.
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
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 fused: bool | None = None) -> None:
        self.config = config
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # "cuda": the current GPU
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = dtype
        self.fused = self.device.type == "cuda" if fused is None else fused

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
        self._add_norm, self._rope_, self._silu_mul = self._ops()

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
        add_norm, rope, silu_mul = self._add_norm, self._rope_, self._silu_mul
        h, kvh, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        head_shape = (d,)
        residual = self.embed[input_ids]  # [num_tokens, hidden]
        x = F.rms_norm(residual, (cfg.hidden_size,), self.layers[0].input_norm, eps)
        for i, layer in enumerate(self.layers):
            qkv = F.linear(x, layer.qkv, layer.qkv_bias)  # [num_tokens, (h + 2 kvh) d]
            if layer.q_norm is None:
                qk = rope(qkv[:, : (h + kvh) * d].view(num_tokens, h + kvh, d), positions)
                q, k = qk[:, :h], qk[:, h:]
            else:
                q = F.rms_norm(qkv[:, : h * d].view(num_tokens, h, d), head_shape,
                               layer.q_norm, eps)
                k = F.rms_norm(qkv[:, h * d : (h + kvh) * d].view(num_tokens, kvh, d),
                               head_shape, layer.k_norm, eps)
                q, k = rope(q, positions), rope(k, positions)
            v = qkv[:, (h + kvh) * d :].view(num_tokens, kvh, d)
            attn_out = attention.forward(i, q, k, v, pool, meta)  # [num_tokens, h * d]
            o = F.linear(attn_out, layer.o, layer.o_bias)
            residual, x = add_norm(o, residual, layer.post_norm, eps)
            mlp = F.linear(silu_mul(F.linear(x, layer.gate_up)), layer.down)
            next_norm = (self.layers[i + 1].input_norm if i + 1 < len(self.layers)
                         else self.final_norm)
            residual, x = add_norm(mlp, residual, next_norm, eps)
        return x

    def _ops(self) -> tuple[Any, Any, Any]:
        """(add_norm, rope, silu_mul): the fused Triton kernels or the torch reference; chosen
        once, at construction."""
        if self.fused:
            from services.engine import triton_ops

            cos, sin = self.rope.cos, self.rope.sin

            def fused_add_norm(x, residual, weight, eps):
                out = triton_ops.add_rms_norm(x, residual, weight, eps)
                return residual, out

            def fused_rope(t, positions):
                return triton_ops.rope_(t, positions, cos, sin)

            return fused_add_norm, fused_rope, triton_ops.silu_mul
        hidden_shape = (self.config.hidden_size,)
        rotary = self.rope

        def add_norm(x, residual, weight, eps):
            residual = residual + x
            return residual, F.rms_norm(residual, hidden_shape, weight, eps)

        def rope(t, positions):
            cos, sin = rotary.cos_sin(positions)
            return rotary.apply(t, cos, sin)

        def silu_mul(gate_up):
            gate, up = gate_up.chunk(2, dim=-1)
            return F.silu(gate) * up

        return add_norm, rope, silu_mul

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[num_rows, hidden] -> float32 logits [num_rows, vocab]."""
        return F.linear(hidden, self.lm_head).float()
