from __future__ import annotations

import sys

from llmrec.cli import main

sys.exit(main())
