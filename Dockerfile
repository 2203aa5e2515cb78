# moe_train on an NVIDIA PyTorch (NGC) image: CUDA, NCCL, apex, flash-attention and a matching torch
# come preinstalled. The C++/CUDA extension is built against the image's torch for A100 (sm_80) and
# H100/H200 (sm_90a).
#
#   docker build -t moe-train .
#   docker run --gpus all --rm moe-train                                  # CLI help
#   docker run --gpus all --ipc=host --rm -v "$PWD:/work" -w /work moe-train \
#       train --config configs/tiny_cpu.yaml data.mock=true
FROM nvcr.io/nvidia/pytorch:25.01-py3

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TORCH_CUDA_ARCH_LIST="8.0 9.0a"

WORKDIR /opt/moe_train
COPY setup.py pyproject.toml README.md ./
COPY csrc ./csrc
COPY moe_train ./moe_train
COPY configs ./configs
COPY launch ./launch

# No build isolation: the extension compiles against the image's torch, which pip leaves in place.
RUN pip install --no-build-isolation -e ".[deepspeed,hf]" \
    && python -c "import moe_train.kernels as k; print('moe_train C++ extension:', k.HAS_EXTENSION)"

ENTRYPOINT ["moe-train"]
CMD ["--help"]
