"""Weight loading: Hugging Face safetensors folders and GGUF files, against transformers."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from services.engine.config import ModelConfig, ModelConfigError
from services.engine.embedded import embedded_model_path
from services.engine.gguf_loader import load_gguf
from services.engine.weights import WeightsError, check_weights, load_hf_weights

_TINY = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
)
_FAMILIES = {
    "llama": (LlamaForCausalLM, LlamaConfig(**_TINY, tie_word_embeddings=True)),
    "mistral": (MistralForCausalLM, MistralConfig(**_TINY, tie_word_embeddings=False)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(**_TINY, tie_word_embeddings=False)),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config(**_TINY, head_dim=32, tie_word_embeddings=False)),
}


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """family -> (saved folder, model), tiny random weights, built offline."""
    out = {}
    for family, (model_cls, cfg) in _FAMILIES.items():
        torch.manual_seed(0)
        model = model_cls(cfg).eval()
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder, safe_serialization=True)
        out[family] = (folder, model)
    return out


def _assert_same(weights: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    state = model.state_dict()
    expected = set(state) - ({"lm_head.weight"} if model.config.tie_word_embeddings else set())
    assert set(weights) == expected
    for name, tensor in weights.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, state[name]), name


@pytest.mark.parametrize("family", list(_FAMILIES))
def test_hf_folder_loads_the_models_tensors(hf_models, family):
    folder, model = hf_models[family]
    weights = load_hf_weights(folder)
    _assert_same(weights, model)
    config = ModelConfig.from_hf_folder(folder)
    assert (config.family, config.num_heads, config.num_kv_heads) == (family, 4, 2)
    assert config.attention_bias == (family == "qwen2")
    assert config.qk_norm == (family == "qwen3")
    assert config.head_dim == (32 if family == "qwen3" else 16)
    check_weights(config, weights)


def test_sharded_folder_loads_the_same(hf_models, tmp_path):
    _, model = hf_models["qwen2"]
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    _assert_same(load_hf_weights(tmp_path), model)


def test_dtype_is_converted_on_load(hf_models):
    folder, model = hf_models["mistral"]
    weights = load_hf_weights(folder, dtype=torch.bfloat16)
    name = "model.layers.1.mlp.down_proj.weight"
    assert weights[name].dtype == torch.bfloat16
    assert torch.equal(weights[name], model.state_dict()[name].to(torch.bfloat16))


def test_check_weights_names_missing_and_misshaped_tensors(hf_models):
    folder, _ = hf_models["qwen3"]
    config = ModelConfig.from_hf_folder(folder)
    weights = load_hf_weights(folder)
    missing = dict(weights)
    del missing["model.layers.1.self_attn.k_norm.weight"]
    with pytest.raises(WeightsError, match=r"model\.layers\.1\.self_attn\.k_norm\.weight"):
        check_weights(config, missing)
    misshaped = dict(weights, **{"model.layers.0.mlp.up_proj.weight": torch.zeros(96, 63)})
    with pytest.raises(WeightsError, match=r"model\.layers\.0\.mlp\.up_proj\.weight is \(96, 63\)"):
        check_weights(config, misshaped)
    untied = dataclasses.replace(ModelConfig.from_hf_folder(hf_models["llama"][0]),
                                 tie_word_embeddings=False)
    with pytest.raises(WeightsError, match=r"lm_head\.weight"):
        check_weights(untied, load_hf_weights(hf_models["llama"][0]))


# --- GGUF -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def embedded() -> tuple[object, torch.nn.Module]:
    path = embedded_model_path()
    ours = load_gguf(path)
    reference = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return ours, reference


def test_embedded_gguf_weights_equal_transformers(embedded):
    ours, reference = embedded
    _assert_same(ours.weights, reference)  # exact: same dequantization, Q/K rows un-permuted


def test_embedded_gguf_config_equals_transformers(embedded):
    ours, reference = embedded
    hf_dict = dict(reference.config.to_dict(), architectures=["LlamaForCausalLM"])
    assert ours.config == ModelConfig.from_hf_dict(hf_dict)
    assert ours.config.tie_word_embeddings and ours.config.num_layers == 30
    assert ours.fields["general.architecture"] == "llama"
    assert len(ours.fields["tokenizer.ggml.tokens"]) == ours.config.vocab_size == 49152


_GGUF_BLOCK = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GGUF_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


def _llama_cpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's Q/K row order, the thing load_gguf must undo."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def _write_gguf(path: Path, arch: str, model: torch.nn.Module, f16: bool = False,
                overrides: dict[str, np.ndarray] | None = None,
                extra: dict[str, np.ndarray] | None = None) -> None:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        array = tensor.numpy()
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads
            array = _llama_cpp_permute(array, heads)
        if name.startswith("model.layers."):
            _, _, layer, *module, kind = name.split(".")
            name = f"blk.{layer}.{_GGUF_BLOCK['.'.join(module)]}.{kind}"
        else:
            name = _GGUF_GLOBAL[name]
        array = (overrides or {}).get(name, array)
        writer.add_tensor(name, array.astype(np.float16) if f16 and array.ndim == 2 else array)
    for name, array in (extra or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("family, f16", [("llama", False), ("qwen2", True), ("qwen3", False)])
def test_tiny_gguf_round_trips(hf_models, tmp_path, family, f16):
    folder, model = hf_models[family]
    path = tmp_path / f"{family}.gguf"
    _write_gguf(path, family, model, f16=f16)
    loaded = load_gguf(path)
    if f16:  # the file holds float16 matrices: compare against the same rounding
        model = type(model)(model.config)
        model.load_state_dict(
            {k: v.half().float() if v.ndim == 2 else v
             for k, v in hf_models[family][1].state_dict().items()}
        )
    _assert_same(loaded.weights, model)
    expected = ModelConfig.from_hf_folder(folder)
    got = dataclasses.replace(loaded.config, bos_token_id=expected.bos_token_id,
                              eos_token_ids=expected.eos_token_ids)
    assert got.rms_norm_eps == pytest.approx(expected.rms_norm_eps)
    assert dataclasses.replace(got, rms_norm_eps=expected.rms_norm_eps) == expected


def _llama31_rope_freqs(head_dim: int, theta: float, factor: float) -> np.ndarray:
    """What llama.cpp's converter writes as rope_freqs.weight for Llama 3.1 (low 1, high 4)."""
    out = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim):
        wavelen = 2 * np.pi / freq
        if wavelen < 8192 / 4:
            out.append(1.0)
        elif wavelen > 8192 / 1:
            out.append(factor)
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_gguf_rope_freqs_become_llama3_scaling(hf_models, tmp_path):
    _, model = hf_models["llama"]
    freqs = _llama31_rope_freqs(16, 10000.0, 8.0)
    assert len(set(freqs.tolist())) > 2  # all three branches: 1, smoothed, factor
    _write_gguf(tmp_path / "l31.gguf", "llama", model, extra={"rope_freqs.weight": freqs})
    loaded = load_gguf(tmp_path / "l31.gguf")
    scaling = loaded.config.rope_scaling
    assert (scaling.rope_type, scaling.factor, scaling.low_freq_factor) == ("llama3", 8.0, 1.0)
    assert (scaling.high_freq_factor, scaling.original_max_position_embeddings) == (4.0, 8192)
    assert not any("rope" in name for name in loaded.weights)
    freqs[3] *= 1.5
    _write_gguf(tmp_path / "odd.gguf", "llama", model, extra={"rope_freqs.weight": freqs})
    with pytest.raises(ModelConfigError, match=r"odd\.gguf: rope_freqs\.weight does not match"):
        load_gguf(tmp_path / "odd.gguf")


def test_gguf_unsupported_architecture_and_tensor_type(hf_models, tmp_path):
    _, model = hf_models["qwen2"]
    _write_gguf(tmp_path / "gpt2.gguf", "gpt2", model)
    with pytest.raises(WeightsError, match=r"gpt2\.gguf.*unsupported GGUF architecture 'gpt2'"):
        load_gguf(tmp_path / "gpt2.gguf")
    ints = {"blk.1.ffn_norm.weight": np.ones(64, dtype=np.int32)}
    _write_gguf(tmp_path / "i32.gguf", "qwen2", model, overrides=ints)
    with pytest.raises(WeightsError, match=r"i32\.gguf.*'blk\.1\.ffn_norm\.weight'.*I32"):
        load_gguf(tmp_path / "i32.gguf")


# --- errors name the file ---------------------------------------------------------------------

def test_truncated_gguf_names_the_file(tmp_path):
    data = embedded_model_path().read_bytes()
    for size in (0, 100, len(data) - 1):  # empty, inside the header, last tensor cut
        path = tmp_path / f"cut{size}.gguf"
        path.write_bytes(data[:size])
        with pytest.raises(WeightsError, match=rf"cut{size}\.gguf.*truncated"):
            load_gguf(path)


def test_text_file_named_gguf_names_the_file(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("this is not a model\n")
    with pytest.raises(WeightsError, match=r"notes\.gguf: not a GGUF file"):
        load_gguf(path)


def test_folder_without_weights_names_the_folder(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(WeightsError, match=rf"{tmp_path}.*\.bin pickles are not loaded"):
        load_hf_weights(tmp_path)
    with pytest.raises(ModelConfigError, match=r"config\.json: not found"):
        ModelConfig.from_hf_folder(tmp_path)


def test_corrupt_safetensors_names_the_file(hf_models, tmp_path):
    data = (hf_models["llama"][0] / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"model\.safetensors: corrupt or truncated"):
        load_hf_weights(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(WeightsError, match=r"model\.safetensors: corrupt or truncated"):
        load_hf_weights(tmp_path)


def test_index_naming_a_missing_shard_names_both(tmp_path):
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match=r"index\.json: .*model-00002-of-00002\.safetensors"):
        load_hf_weights(tmp_path)
