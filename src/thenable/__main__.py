import sys

from thenable.cli import main

sys.exit(main())
