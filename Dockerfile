# moe_train on an NVIDIA PyTorch image (CUDA, NCCL, apex and a matching torch preinstalled).
FROM nvcr.io/nvidia/pytorch:25.01-py3

ENV PYTHONUNBUFFERED=1 \
    TORCH_CUDA_ARCH_LIST="8.0 9.0a"

WORKDIR /workspace/moe_train
COPY setup.py pyproject.toml README.md ./
COPY csrc ./csrc
COPY moe_train ./moe_train
COPY configs ./configs
COPY launch ./launch

# Build against the image's torch (no build isolation) and keep its CUDA torch untouched.
RUN pip install --no-cache-dir --no-build-isolation -e . \
    && python -c "import moe_train, moe_train.kernels as k; print('moe_train ok, C++ extension:', k.HAS_EXTENSION)"

ENTRYPOINT ["moe-train"]
CMD ["--help"]
