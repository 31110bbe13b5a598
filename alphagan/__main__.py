import sys

from alphagan.cli import main

sys.exit(main())
