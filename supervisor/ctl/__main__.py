"""`python -m supervisor.ctl`: as `supervisorctl`."""

import sys

from supervisor.ctl.main import main

sys.exit(main())
