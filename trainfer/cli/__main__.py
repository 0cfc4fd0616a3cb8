import sys

from trainfer.cli import main

sys.exit(main())
