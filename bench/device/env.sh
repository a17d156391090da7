# Sourced ON the GPU machine, in the repository root, at the start of every run: unpacks what
# prepare.sh put in .device/ and sets the environment (the machine's own NVLink-multicast
# switches stay off; UCX's ib module segfaults at exit without UCX_MODULES=^ib).
mkdir -p /tmp/pk /tmp/whl
[ -d /tmp/pk/site ] || tar xzf .device/pkgs.tgz -C /tmp/pk
for w in .device/whl/*.whl; do python3 -m zipfile -e "$w" /tmp/whl; done
export PYTHONPATH=$PWD:/tmp/whl:$PWD/.device/py:/tmp/pk/site
export LD_LIBRARY_PATH=/tmp/pk/lib:/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
export UCX_MODULES=^ib NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
