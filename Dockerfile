# One image for the API and the workers. CPU torch by default; the GPU worker builds with CUDA torch:
#   docker build --build-arg TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" .
# (CUDA wheels bring their own CUDA runtime; the host only needs the NVIDIA driver + container toolkit.)
FROM python:3.11-slim

ARG TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    VOPD_HOME=/data/vopd

WORKDIR /opt/vopd
# torch first, in its own layer: it is by far the largest download and changes least often.
RUN pip install ${TORCH_SPEC}
COPY pyproject.toml README.md ./
COPY vopd ./vopd
COPY app ./app
COPY worker ./worker
COPY frontend ./frontend
# The volume mount points exist (owned by vopd) so fresh named volumes inherit that ownership.
RUN pip install . && useradd --create-home --uid 1000 vopd \
    && mkdir -p /data/vopd/models /data/vopd/datasets /data/vopd/artifacts && chown -R vopd /data/vopd
USER vopd
VOLUME ["/data/vopd"]
EXPOSE 8000

# The same commands the tests run natively: `vopd serve` (here without its local worker) and `vopd worker`.
CMD ["vopd", "serve", "--host", "0.0.0.0", "--port", "8000", "--no-worker"]
