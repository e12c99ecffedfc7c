import sys

from xpuserve.cli import main

sys.exit(main())
