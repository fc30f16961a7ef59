# specvlm image for KubeRay (k8s/*.yaml): the official Ray GPU image for the Ray release pyproject.toml requires
# (ray[data,serve,train]>=2.60; tests/test_k8s.py checks the tag), CUDA torch, and this project at /home/ray/specvlm.
#
#   docker build -t registry.example.com/specvlm:0.1.0 .
#   docker push registry.example.com/specvlm:0.1.0
#
# No real model weights are baked in (only the 11 MB demo model inside the package): targets and drafts are s3://
# prefixes (or a PVC at /models), mirrored at run time into $SPECVLM_HOME. Keep the Python version (py311) the same on every Ray node and the submitter.
FROM rayproject/ray:2.60.0-py311-gpu

# torch from the default package index (its Linux x86_64 wheels bundle CUDA). For another CUDA build pass
#   --build-arg TORCH_INDEX_URL=<a PyTorch wheel index>
ARG TORCH=torch==2.13.0
ARG TORCH_INDEX_URL=

ENV RAY_USAGE_STATS_ENABLED=0 \
    SPECVLM_HOME=/specvlm-home \
    HF_HUB_OFFLINE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "${TORCH}"

WORKDIR /home/ray/specvlm

# Dependencies first (a code change does not reinstall them): install the project's requirements from
# pyproject.toml with stub packages, then the real code in editable mode so configs/ resolve next to it.
COPY --chown=ray:users pyproject.toml README.md ./
RUN mkdir -p specvlm actors pipelines \
    && touch specvlm/__init__.py actors/__init__.py pipelines/__init__.py \
    && pip install . \
    && pip uninstall -y specvlm \
    && rm -rf specvlm actors pipelines build *.egg-info

COPY --chown=ray:users specvlm ./specvlm
COPY --chown=ray:users actors ./actors
COPY --chown=ray:users pipelines ./pipelines
COPY --chown=ray:users benchmarks ./benchmarks
COPY --chown=ray:users configs ./configs
COPY --chown=ray:users k8s ./k8s
RUN pip install --no-deps -e . \
    && python -c "import ray, torch, specvlm, actors.serving, pipelines.caption, pipelines.distill; print(ray.__version__, torch.__version__)" \
    && sudo mkdir -p /specvlm-home /models /shared && sudo chown ray:users /specvlm-home /models /shared
