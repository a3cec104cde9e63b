import sys

from restransfer.cli import main

sys.exit(main())
