import sys

from pmrlhf.cli import main

sys.exit(main())
