# trunkline server image: `docker build -t trunkline .` (see docs/kubernetes.md).
# The base is pinned to a full version; pin its digest too where you build
# (`python:3.11.11-slim-bookworm@sha256:...`) so a rebuild gets the same bytes.
# `--build-arg BASE=...` builds on another image with Python 3.11 (docs/kubernetes.md).
ARG BASE=python:3.11.11-slim-bookworm
FROM ${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN python -m venv /opt/trunkline \
    && /opt/trunkline/bin/pip install ".[kubernetes]"

FROM ${BASE}
COPY --from=build /opt/trunkline /opt/trunkline
# A fixed numeric uid/gid, so `runAsNonRoot` can verify it without a passwd lookup.
RUN groupadd --system --gid 10001 trunkline \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent trunkline
ENV PATH=/opt/trunkline/bin:$PATH PYTHONUNBUFFERED=1 XDG_STATE_HOME=/var/lib
USER 10001:10001
WORKDIR /tmp
# HTTP API, agents' WebSocket and /healthz; SIP over UDP and TCP.
EXPOSE 7880 5060/udp 5060/tcp
ENTRYPOINT ["trunkline", "serve", "--config", "/etc/trunkline/trunkline.toml"]
