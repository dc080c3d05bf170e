"""Where `supervisord` and `supervisorctl` find the config file: `-c`, then `$SUPERVISOR_CONFIG`, then
DEFAULT_PATH (the path the systemd unit gives). Imports only `os`: supervisorctl's start stays fast.
"""

from __future__ import annotations

import os

from supervisor.errors import ConfigError

ENV = "SUPERVISOR_CONFIG"
DEFAULT_PATH = "/etc/reuseport-supervisor/supervisor.yaml"


def locate(given: str | None, environ: os._Environ[str] | dict[str, str] = os.environ) -> str:
    """The config file to read: `given` (-c) as it is (reading it says what is wrong), else the one
    $SUPERVISOR_CONFIG names, else DEFAULT_PATH. ConfigError, in one line, says where it looked."""
    if given:
        return given
    if named := environ.get(ENV):
        if not os.path.exists(named):
            raise ConfigError(named, 0, "", f"no such file (named by ${ENV})")
        return named
    if not os.path.exists(DEFAULT_PATH):
        raise ConfigError(DEFAULT_PATH, 0, "", f"no such file (the default path: neither -c nor ${ENV} was given)")
    return DEFAULT_PATH
