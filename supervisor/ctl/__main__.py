"""`python -m supervisor.ctl`: as `supervisorctl`."""

from supervisor.ctl.main import run

run()
