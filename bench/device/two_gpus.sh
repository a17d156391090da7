#!/usr/bin/env bash
# Two GPUs (kind nvidia-h100-x2): every gpu test (kvd VRAM pools, PD across GPUs, the engine on
# the second GPU), the KV transfer bench, then PD vs unified serving. Logs and results to $OUT.
#   run(kind="nvidia-h100-x2", carry=[".device"], command="bash bench/device/two_gpus.sh")
source bench/device/env.sh
nvidia-smi topo -m | head -4
timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee $OUT/gpu-tests.log | tail -15
timeout 100 python3 -m bench.kv_transfer_gpu --out $OUT/kv_transfer-h100.json > $OUT/kv.log 2>&1
tail -8 $OUT/kv.log
timeout 450 python3 -m bench.serving_gpu --out $OUT/serving-h100.json > $OUT/serving.log 2>&1
echo "serving rc=$?"; tail -25 $OUT/serving.log
