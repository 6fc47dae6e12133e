"""What two or more Tandem processes share. Imports none of actors/, learner/, realrobot/."""
import os

# Tandem reads LeRobot datasets and checkpoints from local paths; never reach for a hub unless
# the user asks for it explicitly (HF_HUB_OFFLINE=0).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
