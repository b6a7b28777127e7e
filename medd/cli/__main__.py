import sys

from medd.cli import main

sys.exit(main())
