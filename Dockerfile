# reuseport-supervisor in a container: supervisord is PID 1 (README, "Containers and Kubernetes").
#   build: docker build -t reuseport-supervisor .
#   run:   docker run --rm -p 8000:8000 --sysctl net.ipv4.tcp_migrate_req=1 reuseport-supervisor
#   reload: docker exec CONTAINER supervisorctl -c /etc/supervisor/supervisor.yaml reload
FROM python:3.11-slim

# setpriv (parent-death signal of every worker) comes with util-linux, part of the Debian base.
WORKDIR /opt/reuseport-supervisor
COPY pyproject.toml README.md ./
COPY supervisor ./supervisor
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin supervisor \
    && install -d -o supervisor -g supervisor -m 0700 /run/supervisor
COPY config/container.yaml /etc/supervisor/supervisor.yaml

# Not root: the sysctl comes from the container runtime (--sysctl, or the pod's securityContext), and
# `migrate: prefer` in the config starts without migration (one warning) where it cannot be set.
USER supervisor
ENV TMPDIR=/run/supervisor
EXPOSE 8000
# Exec form: supervisord itself is PID 1 and gets the signals (TERM stops gracefully, HUP reloads).
STOPSIGNAL SIGTERM
ENTRYPOINT ["supervisord", "-c", "/etc/supervisor/supervisor.yaml"]
