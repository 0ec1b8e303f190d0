"""``python -m ami.broker``: the embedded broker on its own (see ami.broker.server)."""

import sys

from ami.broker.server import main

sys.exit(main())
