"""Serving on two GPUs: PD (prefill on GPU 0, decode on GPU 1) against unified (one replica per
GPU behind the gateway), the same Poisson load of long prompts.

    python -m bench.serving_gpu [--shape 8b] [--num-prompts 240] [--request-rate auto]
                                [--out bench/results/serving-h100.json]

The model is Llama-3.1-8B-shaped with random bf16 weights (written once to a temporary folder
as safetensors), with a word-level tokenizer over tandem bench's word list (so the vocabulary is
178 ids instead of 128,256; the LM head is the only shape that differs, and every generated
token is a whole word: one streamed chunk). Both
deployments run the same `tandem serve` workers (bf16, Triton attention, CUDA graphs, the same
--chunked-prefill-size) behind `tandem gateway`; PD's KV moves through its node's kvd (one kvd
holding the pools of both GPUs: the same-node NVLink path).

Load (`tandem bench`, chat completions, streamed, ignore_eos): random prompts of ~2,000 tokens and
256 output tokens, Poisson arrivals, after a discarded warm-up burst on each deployment.
`--request-rate auto` first measures unified's capacity (the throughput of --capacity-prompts
requests sent at once, by default as many as the load has: a 64-request burst read 8.9-14.4
req/s on the same 2xH100 while unified served 16-18 req/s within the SLOs) and then runs both
deployments at 85% of it; `--rate-fractions 0.85,1.0,1.15` sweeps several fractions of that
capacity, `--request-rate 12,15,18` several fixed rates, on the same two deployments (each
started once, the rates run in turn; `--repeats 3` runs each rate three times with three
workload seeds, and `spread` lists every repeat's good requests). Reported per deployment and
rate: TTFT, ITL, TPOT, E2E (mean, p50, p90, p99), throughput and goodput (TTFT and TPOT SLOs),
each worker's engine duty, batch fill and own latencies during the run (`worker_activity`, from
its /metrics); and PD / unified ratios. The seed's claim, measured: PD's ITL p99 <= 0.5x
unified's with goodput >= unified's. The first rate's run is the headline (top-level
`unified_2x`, `pd_1p1d`, `pd_over_unified`, `goal`); every rate's is under `by_rate`. Results,
with the GPUs named, go to `--out` (after every rate too, marked partial).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from bench import worker_activity
from bench.gpu_baselines import gpu_machine
from bench.procs import free_port
from bench.serving_cpu import Deployment, _ratios, run_load
from services.bench.report import machine_info, percentile

SHAPES = {
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,  # CPU smoke
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16},
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
           "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64},
}


SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>"]


def write_word_tokenizer(folder: Path) -> int:
    """A word-level tokenizer over tandem bench's word list (one token per prompt word), with
    the ChatML specials: every token a random model emits decodes to a whole word, so each is
    one streamed chunk (a byte-level vocabulary makes random models emit partial UTF-8
    characters that the detokenizer holds back, several tokens at a time, which reads as long
    inter-token gaps). Returns the vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from services.bench.workload import WORDS
    from tests.tiny_models import CHATML

    vocab = {token: i for i, token in enumerate([*SPECIALS, *dict.fromkeys(WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "chat_template": CHATML,
        "add_bos_token": False, "tokenizer_class": "PreTrainedTokenizerFast"}))
    return len(vocab)


def write_model(folder: Path, shape: str, device: str) -> None:
    """config.json, random bf16 safetensors (std 0.02, made on `device`) and the tokenizer."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = write_word_tokenizer(folder)
    s = SHAPES[shape]
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **s,
              "vocab_size": vocab_size, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
              "rope_theta": 500000.0, "tie_word_embeddings": False,
              "eos_token_id": SPECIALS.index("<|im_end|>"), "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config))
    h, i, d = s["hidden_size"], s["intermediate_size"], s["head_dim"]
    q, kv = s["num_attention_heads"] * d, s["num_key_value_heads"] * d
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=g, device=device, dtype=torch.bfloat16)
                * 0.02).cpu()

    tensors = {"model.embed_tokens.weight": rand(vocab_size, h),
               "lm_head.weight": rand(vocab_size, h),
               "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    for layer in range(s["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        tensors.update({
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "self_attn.q_proj.weight": rand(q, h), p + "self_attn.k_proj.weight": rand(kv, h),
            p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, q),
            p + "mlp.gate_proj.weight": rand(i, h), p + "mlp.up_proj.weight": rand(i, h),
            p + "mlp.down_proj.weight": rand(h, i)})
    save_file(tensors, str(folder / "model.safetensors"))


def _on_gpu(flags: list[str], gpu: int) -> list[str]:
    return [*flags, "--base-gpu-id", str(gpu)] if "cuda" in flags else flags


def _worker(d: Deployment, name: str, mode: str, flags: list[str]) -> str:
    """Start a worker with its /metrics on a known port, remembered as `d.metrics[name]`."""
    port = free_port()
    address = d.worker(mode, [*flags, "--metrics-port", str(port)])
    d.metrics[name] = f"http://127.0.0.1:{port}/metrics"
    return address


def unified(tmp: Path, worker_flags: list[str]) -> Deployment:
    d = Deployment(tmp)
    workers = [_worker(d, f"unified{gpu}", "null", _on_gpu(worker_flags, gpu))
               for gpu in (0, 1)]
    d.gateway(["--worker", *[f"http://{w}" for w in workers], "--policy", "power_of_two"])
    return d


def pd(tmp: Path, worker_flags: list[str], backend: str) -> Deployment:
    """One node: its kvd (owning a VRAM pool on each GPU), prefill on GPU 0, decode on GPU 1."""
    d = Deployment(tmp)
    node = d.kvd(backend)
    prefill = _worker(d, "prefill", "prefill", _on_gpu([*worker_flags, *node], 0))
    decode = _worker(d, "decode", "decode", _on_gpu([*worker_flags, *node], 1))
    d.gateway(["--pd-disaggregation", "--prefill", f"http://{prefill}",
               "--decode", f"http://{decode}"])
    return d


def itl_by_position(raw_report: Path) -> dict[str, dict[str, float]]:
    """Where in a request its inter-token gaps are long: the first gap (the first token to the
    second; in PD the first token is the prefill side's) against all later gaps, p50 / p99 ms."""
    records = [r for r in json.loads(raw_report.read_text())["requests"]
               if r["is_success"] and r["itl_s"]]

    def q(values: list[float], p: float) -> float:  # as tandem bench's own percentiles
        return round(percentile(values, p) * 1e3, 2)

    first = [r["itl_s"][0] for r in records]
    later = [gap for r in records for gap in r["itl_s"][1:]]
    return {"first_gap_ms": {"p50": q(first, 50), "p99": q(first, 99)},
            "later_gaps_ms": {"p50": q(later, 50), "p99": q(later, 99)}}


def _save_log_tails(tmp: Path, to: Path) -> None:
    """The last lines of every process log of a failed run, in one file beside the results."""
    parts = [f"=== {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-40:])
             for log in sorted(tmp.glob("*.log"))]
    to.parent.mkdir(parents=True, exist_ok=True)
    to.write_text("\n".join(parts) + "\n")


DEPLOYMENTS = ("unified_2x", "pd_1p1d")


def _runs(rates: dict[str, float], repeats: int, seed: int) -> list[tuple[str, float, int]]:
    """(key, req/s, workload seed) of every run, the repeats of a rate one after another."""
    return [(f"{key}#{i + 1}" if i else key, rate, seed + i)
            for key, rate in rates.items() for i in range(repeats)]


def _spread(by_rate: dict) -> dict:
    """Per rate, every repeat's good requests on each side and PD/unified ratios, in order."""
    spread: dict[str, dict[str, list]] = {}
    for key, run in by_rate.items():
        row = spread.setdefault(key.split("#")[0], {
            "unified_num_good": [], "pd_num_good": [], "goodput_ratio": [],
            "itl_p99_ratio": []})
        row["unified_num_good"].append(run["unified_2x"]["summary"]["num_good"])
        row["pd_num_good"].append(run["pd_1p1d"]["summary"]["num_good"])
        row["goodput_ratio"].append(run["pd_over_unified"].get("goodput"))
        row["itl_p99_ratio"].append(run["pd_over_unified"].get("itl_ms_p99"))
    return spread


def _by_rate(by_rate: dict) -> dict:
    """Each rate's results as written: its own fields, and per deployment that has run its
    summary, ITL by position and worker activity (not tandem bench's whole report)."""
    return {key: {k: v for k, v in run.items() if k not in DEPLOYMENTS}
            | {name: {k: run[name][k] for k in ("summary", "itl_by_position", "worker_activity")}
               for name in DEPLOYMENTS if name in run}
            for key, run in by_rate.items()}


def _write(out: str, results: dict) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2, default=str) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    p.add_argument("--num-prompts", type=int, default=240)
    p.add_argument("--input-len", type=int, default=2000)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--range-ratio", type=float, default=1.0)  # exact lengths
    p.add_argument("--request-rate", default="auto", help="requests/s (comma-separated for "
                   "several, the first being the headline), or auto: fractions of unified's "
                   "measured capacity (--rate-fractions)")
    p.add_argument("--capacity-prompts", type=int, default=None,
                   help="requests sent at once to measure unified's capacity (default: "
                   "--num-prompts)")
    p.add_argument("--rate-fractions", default="0.85",
                   help="with --request-rate auto: comma-separated fractions of unified's "
                   "capacity to run both deployments at, the first being the headline")
    p.add_argument("--warmup-prompts", type=int, default=32, help="sent all at once to each "
                   "deployment before anything is measured, results discarded")
    p.add_argument("--repeats", type=int, default=1, help="runs of every rate on each "
                   "deployment, the i-th (from 0) with workload seed --seed + i, keyed 18rps, "
                   "18rps#2, ...: near capacity, single runs of the same rate differ widely")
    p.add_argument("--seed", type=int, default=1, help="tandem bench's workload seed")
    p.add_argument("--chunked-prefill-size", type=int, default=4096)
    p.add_argument("--worker-flags", default="", help="more `tandem serve` flags for every "
                   "worker of both deployments, e.g. \"--max-running-requests 128\"")
    p.add_argument("--slo-ttft-ms", type=float, default=1000)
    p.add_argument("--slo-itl-ms", type=float, default=25, help="TPOT SLO, as tandem bench")
    p.add_argument("--backend", default="nixl", choices=("nixl", "mooncake"))
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cpu: a smoke run of this script (use --shape tiny)")
    p.add_argument("--out", default="bench/results/serving-h100.json")
    args = p.parse_args()
    args.capacity_prompts = args.capacity_prompts or args.num_prompts
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        raise SystemExit("bench.serving_gpu needs two GPUs")
    machine = gpu_machine(torch.device("cuda:0")) if args.device == "cuda" else machine_info()
    results: dict = {"machine": machine, "config": dict(vars(args))}
    with tempfile.TemporaryDirectory(prefix="tandem-serving-gpu-") as tmp_name:
        tmp = Path(tmp_name)
        model = tmp / "model"
        write_model(model, args.shape, args.device)
        flags = ["--model-path", str(model), "--device", args.device,
                 "--chunked-prefill-size", str(args.chunked_prefill_size),
                 *args.worker_flags.split()]
        fractions = [float(f) for f in args.rate_fractions.split(",")]
        rates: dict[str, float] = {} if args.request_rate == "auto" else {
            f"{float(r):g}rps": float(r) for r in args.request_rate.split(",")}
        by_rate: dict[str, dict] = {}
        runs = [("unified_2x", lambda: unified(tmp, flags)),
                ("pd_1p1d", lambda: pd(tmp, flags, args.backend))]
        for name, make in runs:
            try:
                d = make()
            except Exception:
                _save_log_tails(tmp, Path(args.out).with_suffix(".logs.txt"))
                raise
            try:
                # every kernel variant compiled and every worker warm before anything is
                # measured: on a fresh machine the first measured run otherwise paid Triton's
                # compilation (unified's TTFT p99 826-1046 ms there, 122-252 ms warm)
                warm_up = argparse.Namespace(**{**vars(args), "num_prompts": args.warmup_prompts,
                                                "request_rate": "inf"})
                run_load(d, warm_up, tmp, f"{name}-warmup")
                if not rates:  # unified runs first: its capacity sets every rate
                    probe = argparse.Namespace(**{**vars(args),
                                                  "num_prompts": args.capacity_prompts,
                                                  "request_rate": "inf"})
                    summary = run_load(d, probe, tmp, "capacity")["summary"]
                    results["capacity"] = summary
                    rates = {f"{f:g}": round(f * summary["request_throughput"], 2)
                             for f in fractions}
                    print("request rates", rates, flush=True)
                for key, rate, seed in _runs(rates, args.repeats, args.seed):
                    load = argparse.Namespace(**{**vars(args), "request_rate": rate,
                                                 "seed": seed})
                    before = worker_activity.snapshot(d.metrics)
                    run = run_load(d, load, tmp, f"{name}-{key}")
                    run["worker_activity"] = worker_activity.activity(
                        before, worker_activity.snapshot(d.metrics))
                    run["itl_by_position"] = itl_by_position(tmp / f"bench-{name}-{key}.json")
                    by_rate.setdefault(key, {"request_rate": rate})[name] = run
                    # what has run so far: a run cut short by its time limit keeps its rates
                    _write(args.out, {**results, "partial": True, "by_rate": _by_rate(by_rate)})
            except Exception:
                _save_log_tails(tmp, Path(args.out).with_suffix(".logs.txt"))
                raise
            finally:
                d.close()
    for run in by_rate.values():
        ratios = _ratios(run["pd_1p1d"]["summary"], run["unified_2x"]["summary"])
        run["pd_over_unified"] = ratios
        run["goal_met"] = (ratios.get("itl_ms_p99", 9) <= 0.5
                           and ratios.get("goodput", 0) >= 1.0)
    if args.repeats > 1:
        results["spread"] = _spread(by_rate)
    headline = next(iter(by_rate.values()))
    results.update(unified_2x=headline["unified_2x"], pd_1p1d=headline["pd_1p1d"],
                   pd_over_unified=headline["pd_over_unified"])
    results["goal"] = {"itl_p99_ratio_max": 0.5, "goodput_ratio_min": 1.0,
                       "met": headline["goal_met"]}
    results["by_rate"] = _by_rate(by_rate)
    results["config"]["request_rate_used"] = headline["request_rate"]
    _write(args.out, results)
    print(json.dumps({key: {"request_rate": run["request_rate"], "goal_met": run["goal_met"],
                            "pd_over_unified": run["pd_over_unified"]}
                      for key, run in by_rate.items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
