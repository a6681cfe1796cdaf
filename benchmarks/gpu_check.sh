#!/bin/bash
# The GPU check, in one script for a GPU machine: the CUDA tests, the CIFAR-10 training throughput/MFU, the
# loop's per-step bookkeeping (host time) before/after, and DDP vs ZeRO-1/2/3 with one process per GPU.
#
#   bash benchmarks/gpu_check.sh --fetch-wheels   # online, once: pure-Python packages a GPU machine may lack,
#                                                 # into .whl/ (ignored by git; pip needs PyPI)
#   bash benchmarks/gpu_check.sh                  # on the GPU machine, from the repository root
#
# Copy the working tree with .whl/ to a GPU machine and run it there (about 14 minutes). Logs and the table
# go to $OUT (default /tmp/gpu-check): gpu_tests.log, gpu_throughput.log, gpu_throughput.md, host_overhead.log,
# zero_vs_ddp.log. Needs torch with CUDA, accelerate, safetensors, scikit-learn, Pillow, PyYAML, tqdm and
# pytest installed there (DeepSpeed for the ZeRO rows; without it the DDP row only); MLflow is not needed
# (tracking is off throughout).
set -uo pipefail

WHEELS=(omegaconf==2.4.0 ema-pytorch==0.8.3 webdataset==1.0.2 braceexpand==0.1.7 tenacity==9.2.1)
if [[ ${1:-} == --fetch-wheels ]]; then
    exec python3 -m pip download --no-deps --only-binary=:all: --dest .whl "${WHEELS[@]}"
fi

OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

nvidia-smi -L 2>&1 | tee "$OUT/device.txt"
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())' \
    2>&1 | tee -a "$OUT/device.txt"

# 1. The CUDA paths (fp16 loss scaling, bf16, U-Net and sampler on the GPU, no host sync in a step, the input
#    path: pinned uint8 batches whose copy does not hold the host, train.tf32). -rs lists skips with reasons;
#    -s prints the measured copy times.
timeout 240 "$PY" -m pytest -q -s -rs -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

# 2. images/s and MFU of configs/cifar10.yaml (batch 128), per precision variant.
timeout 300 "$PY" benchmarks/gpu_throughput.py --out "$OUT" 2>&1 | tee "$OUT/gpu_throughput.log"
bench_rc=${PIPESTATUS[0]}

# 3. The loop's bookkeeping per step on the GPU, before/after (host time: mode, seeding, EMA).
timeout 90 "$PY" benchmarks/host_overhead.py --device cuda --rounds 30 2>&1 | tee "$OUT/host_overhead.log"
host_rc=${PIPESTATUS[0]}

# 4. DDP vs ZeRO-1/2/3, one process per GPU (digits config, bf16): images/s and the EMA's host share.
modes=ddp,zero1,zero2,zero3
"$PY" -c "import deepspeed" 2>/dev/null || { modes=ddp; echo "deepspeed is not installed here: the DDP row only"; }
timeout 240 "$PY" benchmarks/zero_vs_ddp.py --gpu --precision bf16 --steps 600 --log-every 200 --modes "$modes" \
    2>&1 | tee "$OUT/zero_vs_ddp.log"
zero_rc=${PIPESTATUS[0]}

echo "gpu_check: tests exit $tests_rc, throughput exit $bench_rc, host overhead exit $host_rc, zero exit $zero_rc"
exit $((tests_rc || bench_rc || host_rc || zero_rc))
