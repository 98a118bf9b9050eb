"""`python -m runtime_sdk.formats describe FORMAT FILE`: the file's signature as JSON, or why it does not load."""

import sys

from runtime_sdk.formats import main

sys.exit(main(sys.argv[1:]))
