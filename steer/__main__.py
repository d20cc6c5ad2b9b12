"""``python -m steer ...`` runs the CLI (``accelerate launch -m steer sweep CONFIG.yaml``)."""
import sys

from steer.ui.cli import main

sys.exit(main())
