# charrnn image for Ray clusters (KubeRay head and workers, `ray job submit`, Serve).
# CPU build by default; for GPUs build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
FROM rayproject/ray:2.60.0-py311
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
WORKDIR /home/ray/charrnn
# A C compiler: the int8 generation precision builds its kernel on first use (charrnn/native.py)
RUN sudo apt-get update && sudo apt-get install -y --no-install-recommends gcc libc6-dev && sudo rm -rf /var/lib/apt/lists/*
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md ./
COPY charrnn ./charrnn
RUN pip install --no-cache-dir .
COPY jobs ./jobs
COPY configs ./configs
COPY serve_config.yaml ./
ENV PYTHONUNBUFFERED=1
