# reuseport-supervisor in a container: supervisord is PID 1 (docs/containers.md).
#   build:  docker build -t reuseport-supervisor:0.1.0 .
#   run:    docker run --rm -p 8000:8000 --sysctl net.ipv4.tcp_migrate_req=1 reuseport-supervisor:0.1.0
#   reload: docker exec CONTAINER supervisorctl -c /etc/reuseport-supervisor/supervisor.yaml reload
#
# BASE: any Debian-based image with Python 3.11+ whose `python3 -m venv` works (the official image has
# it; Debian's python3 needs python3-venv). The default is a fixed release of the official image, so a
# rebuild does not move to another Debian or Python by itself; to pin it harder, append its digest
# (`--build-arg BASE=python:3.11.13-slim-bookworm@sha256:...`, from `docker buildx imagetools inspect`).
ARG BASE=python:3.11.13-slim-bookworm
FROM ${BASE}

# A venv of its own, so the same steps work on the official image and on Debian's python3 (whose
# system pip refuses to install: PEP 668), and `python` in the config is the venv's.
ENV VIRTUAL_ENV=/opt/reuseport-supervisor/venv
ENV PATH=/opt/reuseport-supervisor/venv/bin:$PATH
# The source goes to a folder of its own and away after the install: the workers' `python -m ...` then
# imports the venv's package, the one supervisord runs, not a copy in the working folder.
COPY pyproject.toml README.md /tmp/src/
COPY supervisor /tmp/src/supervisor
# setpriv (parent-death signal of every worker) comes with util-linux, part of every Debian base.
RUN python3 -m venv "$VIRTUAL_ENV" \
    && pip install --no-cache-dir --disable-pip-version-check /tmp/src \
    && rm -rf /tmp/src \
    && groupadd --system --gid 10001 supervisor \
    && useradd --system --uid 10001 --gid supervisor --home-dir /nonexistent --shell /usr/sbin/nologin supervisor \
    && install -d -o supervisor -g supervisor -m 0700 /run/reuseport-supervisor
COPY config/container.yaml /etc/reuseport-supervisor/supervisor.yaml
WORKDIR /opt/reuseport-supervisor

# Not root: the sysctl comes from the container runtime (--sysctl, or the pod's securityContext), and
# `migrate: prefer` in the config starts without migration (one warning) where it cannot be set.
USER supervisor
ENV TMPDIR=/run/reuseport-supervisor
EXPOSE 8000 9150
# The master's loop turns (the metrics listener of config/container.yaml): python is in the image, curl
# is not. A config of your own without `metrics:` needs --no-healthcheck (or a HEALTHCHECK of its own).
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9150/healthz', timeout=2)"]
# Exec form: supervisord itself is PID 1 and gets the signals (TERM stops gracefully, HUP reloads).
STOPSIGNAL SIGTERM
ENTRYPOINT ["supervisord", "-c", "/etc/reuseport-supervisor/supervisor.yaml"]
