#!/usr/bin/env bash
# Two GPUs (kind nvidia-h100-x2): PD against unified serving only (bench/serving_gpu.py).
#   run(kind="nvidia-h100-x2", carry=[".device"], command="bash bench/device/serving.sh")
#   a sweep: SERVING_ARGS="--rate-fractions 0.85,1.0,1.15" SERVING_TIMEOUT=570 bash bench/device/serving.sh
source bench/device/env.sh
timeout ${SERVING_TIMEOUT:-450} python3 -m bench.serving_gpu ${SERVING_ARGS:-} --out $OUT/serving-h100.json > $OUT/serving.log 2>&1
echo "serving rc=$?"; tail -25 $OUT/serving.log
