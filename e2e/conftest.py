"""Makes the shared helpers of e2e/ (mqttclient) importable by every suite."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
