import sys

from distpg.cli import main

sys.exit(main())
