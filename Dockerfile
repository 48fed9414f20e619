# The sidecar as a container next to your MTA. Mount your configuration at
# /etc/sidecar/sidecar.toml (check it first with `sidecar check -c FILE`).
#   docker run -v $PWD/sidecar.toml:/etc/sidecar/sidecar.toml:ro --network host sidecar
FROM python:3.11-slim

RUN useradd --system --no-create-home --shell /usr/sbin/nologin sidecar

WORKDIR /opt/sidecar
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
RUN pip install --no-cache-dir . && rm -rf /opt/sidecar/build

USER sidecar
ENV SIDECAR_CONFIG=/etc/sidecar/sidecar.toml
EXPOSE 2525

# Healthy while every listener answers with a 220 banner.
HEALTHCHECK --interval=30s --timeout=10s --start-period=10s --retries=3 \
    CMD ["sidecar", "probe"]

STOPSIGNAL SIGTERM
CMD ["sidecar", "run"]
