"""Real episodes into the learner's live dataset: on disk before they are acknowledged, and each
episode id stored once, also across a crash between the dataset write and the id record."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from common.episode_msg import ACTION_KEY, IMAGE_KEY, STATE_KEY, Episode
from learner.ingest import DUPLICATE, STORED
from learner.real_replay import RealReplay

log = logging.getLogger("tandem.learner")
NO_LIVE_DATASET = "no_live_dataset"


class EpisodeStore:
    def __init__(self, run_dir: Path, replay: Optional[RealReplay]):
        self.replay = replay
        self.ids_file = run_dir / "stored_episode_ids.json"
        self.ids: set[str] = set(json.loads(self.ids_file.read_text())) if self.ids_file.exists() else set()
        self.intent_file = run_dir / "storing_episode.json"
        self._recover_intent()

    def __contains__(self, episode_id: str) -> bool:
        return episode_id in self.ids

    def __len__(self) -> int:
        return len(self.ids)

    def store(self, ep: Episode) -> str:
        """STORED, DUPLICATE or NO_LIVE_DATASET."""
        if ep.episode_id in self.ids:
            return DUPLICATE
        if self.replay is None or self.replay.live is None:
            log.warning("episode %s dropped: learner.live_dataset.root is not set", ep.episode_id)
            return NO_LIVE_DATASET
        # intent first: a crash after the dataset write but before the id is recorded must not
        # store the episode twice when the collector resends it (see _recover_intent)
        write_json(self.intent_file, {"episode_id": ep.episode_id,
                                      "episodes_before": self.replay.size()["sources"]["live"]["episodes"]})
        self.replay.add_episode({IMAGE_KEY: ep.images, STATE_KEY: ep.states, ACTION_KEY: ep.actions}, ep.task)
        self._record(ep.episode_id)  # only after it is on disk: the ack says "stored"
        log.info("stored real episode %s (%d frames, success=%s)", ep.episode_id, ep.num_frames, ep.success)
        return STORED

    def _record(self, episode_id: str):
        self.ids.add(episode_id)
        write_json(self.ids_file, sorted(self.ids))
        self.intent_file.unlink(missing_ok=True)

    def _recover_intent(self):
        """An episode being stored when the learner died: keep its id iff the live dataset has it."""
        if not self.intent_file.exists():
            return
        intent = json.loads(self.intent_file.read_text())
        live = (self.replay.size()["sources"].get("live") if self.replay is not None else None) or {"episodes": 0}
        if live["episodes"] > intent["episodes_before"]:
            log.warning("episode %s was stored before a crash: recording its id", intent["episode_id"])
            self._record(intent["episode_id"])
        else:
            self.intent_file.unlink()


def write_json(path: Path, obj) -> None:
    """Atomically: the file holds the old or the new content, never a torn one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)
