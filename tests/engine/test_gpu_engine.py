"""The engine on a CUDA GPU: Triton attention and decode CUDA graphs give the tokens of the torch
reference; the KV pool is sized by --mem-fraction-static. Runs on the lent GPU machine; skipped
elsewhere."""

from __future__ import annotations

import gc
import threading

import pytest
import torch

from services.engine.attention import TorchPagedAttention
from services.engine.config import ModelConfig
from services.engine.cuda_graphs import DecodeGraphs
from services.engine.engine import EngineConfig, LLMEngine
from services.engine.kv_pool import KVLayout, KVPool
from services.engine.model import LlamaModel
from services.engine.runner import ModelRunner
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import ScheduledBatch
from services.engine.sequence import Sequence
from services.engine.triton_attention import TritonPagedAttention
from services.engine.weights import load_hf_weights
from tests.tiny_models import FAMILIES, VOCAB_SIZE, make_tiny_model

pytestmark = pytest.mark.gpu
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def _engine(folder, device: str, dtype=torch.float32, **overrides) -> LLMEngine:
    model = LlamaModel(ModelConfig.from_hf_folder(folder), load_hf_weights(folder),
                       device=device, dtype=dtype)
    return LLMEngine(model, None, EngineConfig(page_size=16, device=device, **overrides))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["triton+graphs", "triton", "torch_native"])
def test_gpu_greedy_tokens_equal_cpu(tmp_path, family, backend):
    """11 prompts at once: mixed prefill/decode batches, then decode batches that the graphs
    pad (captured sizes 1, 2, 4, 8, 16)."""
    make_tiny_model(family, tmp_path)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB_SIZE - 3, (n,), generator=g).tolist()
               for n in (5, 31, 64, 100, 1, 17, 40, 3, 77, 12, 50)]
    # requests end at different steps, some while the others' next step is in flight
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
              for n in (24, 5, 13, 1, 30, 24, 2, 17, 24, 9, 24)]
    cpu = _engine(tmp_path, "cpu", num_pages=256).generate(prompts, params)
    options = {"triton+graphs": {"attention_backend": "triton"},
               "triton": {"attention_backend": "triton", "disable_cuda_graph": True},
               "torch_native": {"attention_backend": "torch_native"}}[backend]
    engine = _engine(tmp_path, "cuda", num_pages=256, chunked_prefill_size=32,
                     max_running_requests=16, **options)
    assert (engine.runner.graphs is not None) == (backend == "triton+graphs")
    gpu = engine.generate(prompts, params)
    assert [r.token_ids for r in gpu] == [r.token_ids for r in cpu]
    assert [r.finish_reason for r in gpu] == [r.finish_reason for r in cpu]
    assert engine.kv.num_held_pages == 0 and not engine.has_work()


def test_overlapped_decode_equals_eager_with_seeded_sampling_and_aborts(tmp_path):
    """Overlapped graph steps (outputs one step late, tokens fed on the GPU) against the same
    graphs without overlap: the same seeded samples and penalties; aborts mid-decode free
    everything."""
    make_tiny_model("llama", tmp_path)
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, VOCAB_SIZE - 3, (n,), generator=g).tolist()
               for n in (9, 40, 23, 61, 5, 33)]
    params = [SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, seed=100 + i,
                             ignore_eos=True, frequency_penalty=0.5 * (i % 2))
              for i in range(len(prompts))]
    results = {}
    for name, options in (("overlap", {}), ("serial", {"disable_overlap_schedule": True})):
        engine = _engine(tmp_path, "cuda", num_pages=128, attention_backend="triton",
                         **options)
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            engine.add_request(f"r{i}", prompt, p)
        tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
        steps = 0
        while engine.has_work():
            for out in engine.step():
                tokens[out.request_id] += out.new_token_ids
            steps += 1
            if steps == 8:  # mid-decode in both modes
                engine.abort("r1")
                engine.abort("r4")
        assert engine.kv.num_held_pages == 0
        assert (engine._overlap is not None) == (name == "overlap")
        results[name] = tokens
    for rid in ("r0", "r2", "r3", "r5"):
        assert results["overlap"][rid] == results["serial"][rid]
        assert len(results["overlap"][rid]) == 20
    for rid in ("r1", "r4"):  # aborted: outputs lag one step when overlapped
        short, long = sorted((results["overlap"][rid], results["serial"][rid]), key=len)
        assert long[: len(short)] == short and len(long) - len(short) <= 1


def test_bf16_triton_and_graphs_logits_track_the_torch_reference(tmp_path):
    """bfloat16: both backends fed the same tokens (teacher forcing: the reference's greedy
    choice) give logits within bf16 rounding, prefill and 12 decode steps (graph-padded)."""
    make_tiny_model("llama", tmp_path)
    cfg = ModelConfig.from_hf_folder(tmp_path)
    model = LlamaModel(cfg, load_hf_weights(tmp_path), device="cuda", dtype=torch.bfloat16)
    layout = KVLayout(64, cfg.num_layers, 16, cfg.num_kv_heads, cfg.head_dim, torch.bfloat16)
    ref_pool, tri_pool = KVPool.allocate(layout, "cuda"), KVPool.allocate(layout, "cuda")
    reference = ModelRunner(model, ref_pool, TorchPagedAttention(
        cfg.num_heads, cfg.num_kv_heads, cfg.head_dim))
    triton = TritonPagedAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, None,
                                  torch.device("cuda"))
    graphs = DecodeGraphs(model, tri_pool, triton, max_batch=8, max_pages_per_seq=12)
    ours = ModelRunner(model, tri_pool, triton, graphs)
    g = torch.Generator().manual_seed(5)
    seqs = [Sequence(f"r{i}", torch.randint(0, VOCAB_SIZE, (n,), generator=g).tolist(), n,
                     GREEDY, i, page_ids=list(range(12 * i, 12 * i + 12)))
            for i, n in enumerate((7, 40, 16, 33, 90))]
    for _ in range(13):
        batch = ScheduledBatch(seqs, [s.num_uncomputed_tokens for s in seqs])
        expected, got = reference.run(batch), ours.run(batch)
        assert got.sample_indices == expected.sample_indices == list(range(len(seqs)))
        scale = expected.logits.abs().max().item()
        torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=0.03 * scale)
        for seq, num, row in zip(seqs, batch.num_new_tokens, expected.logits, strict=True):
            seq.num_computed_tokens += num
            seq.token_ids.append(int(row.argmax()))
    assert torch.equal(tri_pool.data.isnan().any(), torch.tensor(False, device="cuda"))


def test_mem_fraction_static_sizes_the_pool(tmp_path):
    """The pool takes what --mem-fraction-static leaves after everything already on the card
    (weights, and here whatever earlier tests of this process still hold)."""
    make_tiny_model("llama", tmp_path)
    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    fraction = round((total - free) / total + 0.05, 4)  # rounding may add up to 0.005%
    budget = fraction * total - (total - free)  # what the flag leaves now, before the weights
    engine = _engine(tmp_path, "cuda", mem_fraction_static=fraction)
    pool_bytes = engine.pool.layout.total_bytes
    assert budget - 0.01 * total < pool_bytes <= budget
    assert engine.pool.data.is_cuda
    (result,) = engine.generate([[1, 2, 3]], GREEDY)
    assert len(result.token_ids) == 24


def test_engine_on_a_second_gpu_driven_from_another_thread(tmp_path):
    """A worker with --base-gpu-id 1: graphs captured and Triton kernels launched on that GPU,
    from the engine loop's own thread (CUDA's current device is per thread)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    make_tiny_model("llama", tmp_path)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, VOCAB_SIZE - 3, (n,), generator=g).tolist() for n in (7, 30)]
    cpu = _engine(tmp_path, "cpu", num_pages=64).generate(prompts, GREEDY)
    engine = _engine(tmp_path, "cuda:1", num_pages=64)
    assert engine.runner.graphs is not None and engine.pool.data.device.index == 1
    results = []

    def drive() -> None:
        engine.use_device()
        results.extend(engine.generate(prompts, GREEDY))

    torch.cuda.set_device(0)  # the other thread must not depend on this one's device
    worker = threading.Thread(target=drive)
    worker.start()
    worker.join(120)
    assert [r.token_ids for r in results] == [r.token_ids for r in cpu]
