"""`python -m payer_client run|send|balance|history|status|ping|watch ...`"""

import sys

from payer_client.cli import main

if __name__ == "__main__":
    sys.exit(main())
