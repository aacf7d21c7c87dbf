# alex-server image. Build: docker build -t alex-server:0.1.0 .   Deploy: deploy/helm/alex-server (docs/deploy.md).
#
# Two stages on the same base (the virtual environment is copied whole, so its interpreter path must exist in both):
# `build` installs the locked dependencies (requirements.lock, every file hash-checked) and then the project without
# dependencies into /opt/alex; the runtime stage adds the bash sandbox's tools and tini, and runs as 10001:10001.
# tests/deploy/test_image.py replays the build stage's steps in a fresh virtual environment and starts the entry
# point, because no Docker engine runs in CI. To pin the base by digest, write it on both FROM lines
# (python:3.11-slim-bookworm@sha256:…); hadolint checks these lines, so they name the image literally.

FROM python:3.11-slim-bookworm AS build
ARG VENV=/opt/alex
ARG SRC=/src
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1
WORKDIR ${SRC}
RUN python -m venv "${VENV}"
COPY requirements.lock ./
# --no-deps: the lock is the whole environment; a package it forgot fails `pip check` below instead of being
# fetched unpinned.
RUN "${VENV}/bin/pip" install --require-hashes --no-deps --only-binary=:all: -r requirements.lock
COPY pyproject.toml README.md ./
COPY service ./service
# The build backend (setuptools) comes from the lock too: --no-build-isolation downloads nothing.
RUN "${VENV}/bin/pip" install --no-deps --no-build-isolation --no-compile . \
    && "${VENV}/bin/python" -m compileall -q "${VENV}/lib" \
    && "${VENV}/bin/pip" check

FROM python:3.11-slim-bookworm AS runtime
ARG VENV=/opt/alex
LABEL org.opencontainers.image.title="alex-server" \
      org.opencontainers.image.description="Runs AI-agent tasks and streams their events over Server-Sent Events" \
      org.opencontainers.image.source="https://github.com/alex-server/alex-server" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
# bubblewrap: the bash tool's namespaces (docs/security.md; it needs user namespaces, see docs/deploy.md);
# util-linux: prlimit and setpriv; tini: PID 1, forwards SIGTERM to the server (which drains) and reaps the
# orphans of the agent's commands. Debian versions float within bookworm to get its security updates.
RUN apt-get update \
    && apt-get install -y --no-install-recommends bubblewrap tini util-linux \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 alex \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin alex \
    && mkdir /data \
    && chown 10001:10001 /data \
    && chmod 0711 /data
COPY --from=build ${VENV} ${VENV}
ENV PATH="${VENV}/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ALEX_HOST=0.0.0.0 \
    PORT=8080 \
    ALEX_DATA_DIR=/data \
    ALEX_LOG_FORMAT=json
WORKDIR /data
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8080') + '/health', timeout=4)"]
ENTRYPOINT ["/usr/bin/tini", "--", "alex-server"]
CMD ["serve"]
