"""`python -m supervisor.daemon`: as `supervisord`."""

import sys

from supervisor.daemon.main import main

sys.exit(main())
