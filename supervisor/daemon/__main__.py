"""`python -m supervisor.daemon`: as `supervisord`."""

import sys

from supervisor.daemon.entry import main

sys.exit(main())
