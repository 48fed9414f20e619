# The sidecar as a container next to your MTA (README: "The container"). Build and run:
#   docker build -t smtp-proxy-sidecar .
#   docker run -d --name sidecar --network host --stop-timeout 45 \
#       -v /srv/sidecar:/etc/sidecar:ro -v sidecar-state:/var/lib/sidecar smtp-proxy-sidecar
# /var/lib/sidecar (delivery.state_dir: TLS-RPT results, MTA-STS cache) belongs to uid 2525;
# a named volume there keeps it across container re-creations.
# With Podman/Buildah: podman build --format docker ... (their default OCI format has no
# HEALTHCHECK: it is dropped with a warning). scripts/container-check.sh builds and runs it.
# Mount the DIRECTORY that holds sidecar.toml (a single-file bind mount keeps the old file
# after an edit on the host, and SIGHUP would re-read that one). The files must be readable
# by uid/gid 2525, the user the sidecar runs as. Check the file first:
#   docker run --rm -v /srv/sidecar:/etc/sidecar:ro smtp-proxy-sidecar sidecar check
# A starter file (the working directory is not writable: write to stdout):
#   docker run --rm smtp-proxy-sidecar sidecar init - > /srv/sidecar/sidecar.toml
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# Stage 1: install the sidecar and its pinned dependencies into a venv. The source tree, the
# wheel built from it and pip's caches stay in this stage.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY sidecar ./sidecar
RUN python -m venv /opt/sidecar \
    && /opt/sidecar/bin/pip install --quiet -c constraints.txt . \
    && /opt/sidecar/bin/pip uninstall --quiet --yes pip setuptools
COPY container/healthcheck.py /opt/sidecar/libexec/healthcheck.py

# Stage 2: the base image, the user, and the venv: nothing else.
FROM ${PYTHON_IMAGE}
# A fixed uid/gid (2525, like the default listener port): the config and CA files mounted
# into the container must be readable by it; Kubernetes' runAsNonRoot needs it numeric.
# -K SYS_UID_MAX=2525: 2525 is above Debian's system range (999), where useradd --system
# warns; without --system it would allot the user subordinate uids.
# /var/lib/sidecar: [delivery] state_dir's default (MTA-STS policy cache, TLS-RPT results),
# owned by that user. A VOLUME: it outlives the container and stays writable when the root
# file system is read-only (docker run --read-only, Kubernetes readOnlyRootFilesystem: mount
# an emptyDir or a volume there).
RUN groupadd --system --gid 2525 sidecar \
    && useradd --system -K SYS_UID_MAX=2525 --uid 2525 --gid 2525 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin sidecar \
    && install -d -o 2525 -g 2525 -m 0750 /var/lib/sidecar
VOLUME /var/lib/sidecar
COPY --from=build /opt/sidecar /opt/sidecar
ENV PATH=/opt/sidecar/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    SIDECAR_CONFIG=/etc/sidecar/sidecar.toml
USER 2525:2525
WORKDIR /
# The default listener. A port below 1024 needs more than --cap-add NET_BIND_SERVICE for a
# non-root user: see the README.
EXPOSE 2525

# Healthy while every listener answers 220 (and /healthz when [status] is set), with the
# configuration the running `sidecar run` was given: -c FILE, --config=FILE or SIDECAR_CONFIG.
HEALTHCHECK --interval=30s --timeout=10s --start-period=10s --retries=3 \
    CMD ["/opt/sidecar/bin/python", "/opt/sidecar/libexec/healthcheck.py", "--timeout", "5"]

# SIGTERM: stop accepting, give open sessions server.shutdown_grace (30 s by default). Docker
# kills after 10 s unless told otherwise: run with --stop-timeout 45 (compose:
# stop_grace_period: 45s; Kubernetes: terminationGracePeriodSeconds: 45).
STOPSIGNAL SIGTERM
CMD ["sidecar", "run"]
