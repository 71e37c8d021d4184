"""`python -m omniwall.cni`: the plugin executable (install it as `omniwall` in the runtime's CNI_PATH)."""

import sys

from omniwall.cni.plugin import main

sys.exit(main())
