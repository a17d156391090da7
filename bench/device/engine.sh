#!/usr/bin/env bash
# One GPU (kind nvidia-h100-x1): the kernel and engine GPU tests, then bench/engine_gpu.py.
#   run(kind="nvidia-h100-x1", carry=[".device"], command="bash bench/device/engine.sh")
source bench/device/env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/engine/test_triton_attention.py \
    tests/engine/test_triton_ops.py tests/engine/test_gpu_engine.py 2>&1 | tee $OUT/gpu-tests.log | tail -30
timeout 300 python3 -m bench.engine_gpu --out $OUT/engine-h100.json 2>&1 | tee $OUT/bench.log | tail -30
