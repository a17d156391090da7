"""`tandem serve` flags: the seed's command lines parse, missing features fail naming the flag."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from services.common.serve_config import ServeConfig, build_parser, parse_serve_args

# The seed's Llama single-node commands (seed/pd_disaggregation.md), launch_server flags only.
SEED_PREFILL = ["--model-path", "meta-llama/Llama-3.1-8B-Instruct", "--disaggregation-mode",
                "prefill", "--port", "30000", "--disaggregation-ib-device", "mlx5_roce0"]
SEED_DECODE = ["--model-path", "meta-llama/Llama-3.1-8B-Instruct", "--disaggregation-mode",
               "decode", "--port", "30001", "--base-gpu-id", "1", "--disaggregation-ib-device",
               "mlx5_roce0"]
# One DeepSeek multi-node decode command: every flag parses; the missing features then fail.
SEED_DEEPSEEK = ["--model-path", "deepseek-ai/DeepSeek-V3-0324", "--disaggregation-ib-device",
                 "mlx5_0", "--disaggregation-mode", "decode", "--host", "10.0.0.2", "--port",
                 "30001", "--trust-remote-code", "--dist-init-addr", "10.0.0.1:5000",
                 "--nnodes", "2", "--node-rank", "0", "--tp-size", "16", "--dp-size", "8",
                 "--enable-dp-attention", "--moe-a2a-backend", "deepep",
                 "--mem-fraction-static", "0.8", "--max-running-requests", "128"]


def test_defaults_come_from_the_dataclass():
    config = parse_serve_args([])
    assert config == ServeConfig()
    assert (config.disaggregation_mode, config.disaggregation_transfer_backend) == (
        "null", "mooncake")
    assert (config.host, config.port, config.page_size, config.chunked_prefill_size) == (
        "127.0.0.1", 30000, 16, 512)
    assert config.model_path is None and config.device == "auto" and config.kvd_port == 17000
    assert config.kvd_socket.startswith("/tmp/tandem-kvd-")
    defaults = {a.dest: a.default for a in build_parser()._actions if a.dest != "help"}
    assert defaults == {f.name: getattr(ServeConfig(), f.name)
                        for f in dataclasses.fields(ServeConfig)}


def test_seed_llama_commands_parse():
    prefill = parse_serve_args(SEED_PREFILL)
    assert (prefill.disaggregation_mode, prefill.port, prefill.disaggregation_ib_device) == (
        "prefill", 30000, "mlx5_roce0")
    decode = parse_serve_args(SEED_DECODE)
    assert (decode.disaggregation_mode, decode.port, decode.base_gpu_id) == ("decode", 30001, 1)


def test_every_seed_flag_is_known():
    args, unknown = build_parser().parse_known_args(SEED_DEEPSEEK)
    assert unknown == []
    assert args.tp_size == 16 and args.moe_a2a_backend == "deepep" and args.trust_remote_code


@pytest.mark.parametrize("flags, flag, words", [
    (["--tp-size", "2"], "--tp-size 2", "one device"),
    (["--dp-size", "8"], "--dp-size 8", "one device"),
    (["--nnodes", "2", "--node-rank", "1"], "--nnodes 2", "one device"),
    (["--node-rank", "1"], "--node-rank 1", "--nnodes"),
    (["--enable-dp-attention"], "--enable-dp-attention", "not implemented"),
    (["--moe-a2a-backend", "deepep"], "--moe-a2a-backend deepep", "MoE"),
    (["--mem-fraction-static", "1.5"], "--mem-fraction-static", "(0, 1)"),
    (["--page-size", "0"], "--page-size", ">= 1"),
    (["--num-kv-pages", "0"], "--num-kv-pages", ">= 1"),
    (["--max-model-len", "1"], "--max-model-len", ">= 2"),
    (["--port", "70000"], "--port", "[0, 65535]"),
])
def test_missing_features_fail_naming_the_flag(flags, flag, words):
    with pytest.raises(ValueError) as info:
        parse_serve_args(flags)
    assert flag in str(info.value) and words in str(info.value)


def test_deepseek_command_fails_on_the_first_missing_feature():
    with pytest.raises(ValueError, match="--tp-size 16"):
        parse_serve_args(SEED_DEEPSEEK)


def test_accepted_flags_without_effect_are_noted():
    assert ServeConfig().notes() == []
    assert parse_serve_args(["--moe-a2a-backend", "none"]).moe_a2a_backend == "none"
    notes = parse_serve_args(["--dist-init-addr", "10.0.0.1:5000", "--trust-remote-code",
                              "--disaggregation-ib-device", "mlx5_0"]).notes()
    assert len(notes) == 3
    assert "--dist-init-addr" in notes[0] and "--nnodes" in notes[0]
    assert "--trust-remote-code" in notes[1] and "never runs code" in notes[1]
    assert "--disaggregation-ib-device" in notes[2] and "null mode" in notes[2]
    assert parse_serve_args(SEED_DECODE).notes() == []  # the ib device matters in decode mode


def test_malformed_flags_are_argparse_errors(capsys):
    for argv in (["--disaggregation-mode", "both"], ["--disaggregation-transfer-backend", "x"],
                 ["--port", "http"], ["--no-such-flag"]):
        with pytest.raises(SystemExit) as info:
            parse_serve_args(argv)
        assert info.value.code == 2
    assert "invalid choice: 'both'" in capsys.readouterr().err


def test_config_module_does_not_import_torch():
    code = ("import sys, services.common.serve_config as c; c.parse_serve_args([]); "
            "assert 'torch' not in sys.modules and 'grpc' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


def test_gpu_flags_parse_and_bad_values_fail_naming_the_flag(capsys):
    config = parse_serve_args(["--dtype", "bfloat16", "--attention-backend", "torch_native",
                               "--disable-cuda-graph", "--cuda-graph-max-bs", "8",
                               "--disable-overlap-schedule"])
    assert (config.dtype, config.attention_backend, config.cuda_graph_max_bs) == (
        "bfloat16", "torch_native", 8)
    assert config.disable_cuda_graph and config.disable_overlap_schedule
    for argv in (["--dtype", "bf16"], ["--attention-backend", "flashinfer"]):
        with pytest.raises(SystemExit) as info:
            parse_serve_args(argv)
        assert info.value.code == 2
    assert "invalid choice: 'flashinfer'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--cuda-graph-max-bs must be >= 1"):
        parse_serve_args(["--cuda-graph-max-bs", "0"])
