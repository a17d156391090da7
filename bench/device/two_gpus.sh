#!/usr/bin/env bash
# Two GPUs (kind nvidia-h100-x2): every gpu test (kvd VRAM pools, PD across GPUs, the engine on
# the second GPU), the KV transfer, peer copy and gRPC benches; with WITH_SERVING=1 also PD vs
# unified serving (serving.sh; together they may pass one call's 600 s). Logs, results to $OUT.
#   run(kind="nvidia-h100-x2", carry=[".device"], command="bash bench/device/two_gpus.sh")
source bench/device/env.sh
nvidia-smi topo -m | head -4
# the gpu tests live in these directories (tests/gateway needs openai, which the machine lacks)
timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/engine tests/kvd tests/pd 2>&1 | tee $OUT/gpu-tests.log | tail -15
timeout 150 python3 -m bench.kv_transfer_gpu --out $OUT/kv_transfer-h100.json > $OUT/kv.log 2>&1
tail -11 $OUT/kv.log
timeout 60 python3 -m bench.peer_copy_gpu --out $OUT/peer_copy-h100.json 2>&1 | tail -9
timeout 120 python3 -m bench.grpc_latency --out $OUT/grpc_latency-h100.json 2>&1 | tail -6
[ -n "$WITH_SERVING" ] && bash bench/device/serving.sh
