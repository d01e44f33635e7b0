# syntax=docker/dockerfile:1
# The llmrec image the KubeRay manifests run (cluster/kuberay/*.yaml): Ray's own image plus torch and
# llmrec[cpu|gpu,eval] at the versions of constraints.txt, code included, so pods start without installing
# anything (no runtime-env pip, no working_dir upload). Build from the repository root:
#
#   make image                 # CPU pods: $(IMAGE):<version>      on rayproject/ray:2.60.0-py311
#   make image VARIANT=gpu     # GPU pods: $(IMAGE):<version>-gpu  on rayproject/ray:2.60.0-py311-gpu
#   (= docker build --build-arg VARIANT=gpu -t ghcr.io/YOUR-ORG/llmrec:0.1.0-gpu .)
#
# RAY_VERSION must stay the ray pin of constraints.txt (tests/test_cluster_configs.py checks it).
ARG RAY_VERSION=2.60.0
ARG PYTHON_TAG=py311
ARG VARIANT=cpu

FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG} AS base-cpu
FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-gpu AS base-gpu

FROM base-${VARIANT}
ARG VARIANT
# where torch comes from: the CPU wheel index for the cpu image; PyPI (its default CUDA build) for gpu.
# Another CUDA: --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG TORCH_INDEX=
WORKDIR /home/ray/llmrec
COPY --chown=ray:users constraints.txt ./
# torch alone first, without dependencies, from its index: the CPU index only serves torch's own build, and
# pip must not pick a CUDA torch for the CPU image. Its dependencies (for gpu: the nvidia-* CUDA wheels) come
# with the next step, from PyPI, because pip resolves the requirements of the installed torch there.
RUN set -eux; \
    index="${TORCH_INDEX:-$([ "$VARIANT" = gpu ] && echo https://pypi.org/simple || echo https://download.pytorch.org/whl/cpu)}"; \
    torch_pin="$(sed -n 's/^torch==//p' constraints.txt)"; \
    pip install --no-cache-dir --no-deps --index-url "$index" "torch==${torch_pin}"
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users llmrec ./llmrec
# llmrec itself (a regular install: `python -m llmrec.jobs.<name>` and `llmrec` work from any folder), its
# VARIANT extra (faiss-cpu or faiss-gpu, never both) and the eval extra; every version from constraints.txt
RUN pip install --no-cache-dir -c constraints.txt ".[${VARIANT},eval]" \
    && python -c "import faiss, torch, llmrec; print('llmrec', llmrec.__version__, 'torch', torch.__version__, 'faiss', faiss.__version__)"
# Serve config and job flag files, for `python -m llmrec.jobs.deploy --serve-config cluster/serve.yaml`
COPY --chown=ray:users cluster ./cluster
# the encoder is the bundled MiniLM package (or a folder you mount); never the Hub
ENV HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0
