#!/usr/bin/env bash
# Two GPUs (kind nvidia-h100-x2): PD against unified serving only (bench/serving_gpu.py).
#   run(kind="nvidia-h100-x2", carry=[".device"], command="bash bench/device/serving.sh")
source bench/device/env.sh
timeout 450 python3 -m bench.serving_gpu --out $OUT/serving-h100.json > $OUT/serving.log 2>&1
echo "serving rc=$?"; tail -25 $OUT/serving.log
