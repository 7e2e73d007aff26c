# reconciler sidecar image.
#
#   docker build -t reconciler .
#   docker run --rm -v $PWD/config/docker/reconciler.yaml:/etc/reconciler/reconciler.yaml:ro \
#       -p 127.0.0.1:9400:9400 reconciler run --config /etc/reconciler/reconciler.yaml --region us-east
#
# Two stages: the wheel is built with the full toolchain, the runtime image only gets
# the installed package (psycopg[binary] and confluent-kafka ship manylinux wheels
# with libpq and librdkafka inside, so no system libraries are needed).

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# setup.py copies runbooks/, config/ and pom.xml into the wheel (reconciler/_data/)
COPY pyproject.toml setup.py MANIFEST.in README.md LICENSE constraints.txt pom.xml ./
COPY reconciler ./reconciler
COPY runbooks ./runbooks
COPY config ./config
RUN python -m pip wheel --constraint constraints.txt --wheel-dir /wheels .

FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    RECONCILER_CONFIG=/etc/reconciler/reconciler.yaml
COPY --from=build /wheels /wheels
RUN python -m pip install --no-index --find-links /wheels reconciler-dr && rm -rf /wheels \
    && groupadd --system --gid 10001 reconciler \
    && useradd --system --uid 10001 --gid reconciler --no-create-home --shell /usr/sbin/nologin reconciler \
    && mkdir -p /etc/reconciler
USER 10001:10001
WORKDIR /home/reconciler

# /metrics, /healthz, /readyz. Inside a container the config binds 0.0.0.0:9400 so
# that the port can be published; publish it on a private interface only.
EXPOSE 9400

# Liveness only (/healthz): readiness (/readyz) is for traffic routing, and a region
# that is catching up must not be restarted for not being ACTIVE yet.
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9400/healthz', timeout=2)"]

ENTRYPOINT ["reconciler"]
CMD ["run", "--config", "/etc/reconciler/reconciler.yaml", "--region", "us-east"]
