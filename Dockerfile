# The image k8s/rayservice.yaml runs (ghcr.io/example/liveserve:0.1.0 there): Ray 2.60 on Python 3.11
# with CUDA, a CUDA build of torch, and liveserve with its bundled default model.
#   docker build -t REGISTRY/liveserve:TAG . && docker push REGISTRY/liveserve:TAG
# flash-attn (the `gpu` extra) compiles for a long time; add it with `pip install ".[gpu]"` if wanted.
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/liveserve
COPY --chown=ray:users pyproject.toml setup.py README.md ./
COPY --chown=ray:users liveserve liveserve
COPY --chown=ray:users services services
COPY --chown=ray:users orchestration orchestration
COPY --chown=ray:users loadtest loadtest
COPY --chown=ray:users protos protos

RUN pip install --no-cache-dir "torch==2.13.0" --index-url https://download.pytorch.org/whl/cu128 \
 && pip install --no-cache-dir .
