import sys

from medusa.interfaces.cli import main

sys.exit(main())
