#!/usr/bin/env bash
# Optional GPU build: `simpleseg` with candle's CUDA backend, using the CUDA compiler and
# headers NVIDIA publishes on PyPI (no system CUDA toolkit needed; the machine that runs the
# binary needs the NVIDIA driver, and loads cuBLAS/cuRAND/NVRTC at run time).
#
#     bash scripts/build/build_cuda.sh [COMPUTE_CAP]      # default 90 (H100/H200); 80 for A100, 89 for L4/L40
#
# Writes target/cuda/release/simpleseg. The wheels go to target/cuda-toolkit (re-used).
set -euo pipefail
cd "$(dirname "$0")/../.."
CAP="${1:-90}"
TOOLKIT="$PWD/target/cuda-toolkit"
CUDA="$TOOLKIT/nvidia/cu13"
if [ ! -x "$CUDA/bin/nvcc" ] || [ ! -x "$CUDA/nvvm/bin/cicc" ]; then
  mkdir -p "$TOOLKIT/wheels"
  # The compiler driver, its front end (nvvm) and headers (crt), the runtime and the CUDA C++
  # core libraries (cccl), and the libraries candle links against at run time.
  python3 -m pip download --no-deps -q -d "$TOOLKIT/wheels" \
    "nvidia-cuda-nvcc==13.4.*" "nvidia-nvvm==13.4.*" "nvidia-cuda-crt==13.4.*" \
    "nvidia-cuda-runtime==13.4.*" "nvidia-cuda-cccl==13.3.*" "nvidia-cuda-nvrtc==13.4.*" \
    "nvidia-cublas==13.*" "nvidia-curand==10.*"
  for w in "$TOOLKIT"/wheels/*.whl; do python3 -m zipfile -e "$w" "$TOOLKIT"; done
  chmod -R +x "$CUDA/bin" "$CUDA/nvvm/bin"
fi
# The wheels ship versioned libraries only, and no driver: link against unversioned names,
# and against a stub libcuda (soname libcuda.so.1, every driver API entry point of cuda.h)
# that the driver's own library replaces at run time.
for lib in cublas cublasLt cudart nvrtc curand; do
  ln -sf "$(basename "$(ls "$CUDA"/lib/lib$lib.so.* | head -1)")" "$CUDA/lib/lib$lib.so"
done
if [ ! -f "$CUDA/lib/libcuda.so" ]; then
  python3 - "$CUDA/include" > "$TOOLKIT/libcuda_stub.c" <<'PY'
import re, sys
names = set()
text = open(f"{sys.argv[1]}/cuda.h").read()
names |= set(re.findall(r"CUDAAPI\s+(cu[A-Za-z0-9_]+)\s*\(", text))
names |= set(re.findall(r"#define\s+cu[A-Za-z0-9_]+\s+(cu[A-Za-z0-9_]+)\b", text))
# The profiler's entry points (cudaProfiler.h is not in the wheels; its typedefs are).
text = open(f"{sys.argv[1]}/cudaProfilerTypedefs.h").read()
names |= set(re.findall(r"PFN_(cu[A-Za-z0-9]+)_v[0-9]+", text))
for name in sorted(names):
    print(f"void {name}(void) {{}}")
PY
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CUDA/lib/libcuda.so" "$TOOLKIT/libcuda_stub.c"
fi
# CUDA 13.4: the newest toolkit candle's CUDA bindings (cudarc 0.19) know.
export PATH="$CUDA/bin:$PATH" CUDA_ROOT="$CUDA" CUDA_PATH="$CUDA" CUDA_COMPUTE_CAP="$CAP" CUDARC_CUDA_VERSION=13040
export LIBRARY_PATH="$CUDA/lib:${LIBRARY_PATH:-}" LD_LIBRARY_PATH="$CUDA/lib:${LD_LIBRARY_PATH:-}"
nvcc --version | tail -1
CARGO_TARGET_DIR=target/cuda cargo build --release --locked -p simpleseg --features cuda
ls -la target/cuda/release/simpleseg
