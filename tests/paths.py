"""Where the tests find the repository."""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
