import sys

from unitbox.cli import main

sys.exit(main())
