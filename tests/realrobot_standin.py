"""A stand-in for the learner's side of the episode push (tests only): it binds the data and
control endpoints, stores each received episode once (de-duplicated on episode_id) and answers
episode_ack queries, exactly as common/episode_msg.py asks of the learner."""
from __future__ import annotations

import threading
from collections import Counter

from common.channels import ControlServer, DataReceiver
from common.episode_msg import ack_reply, is_ack_request, message_to_episode


class StandInLearner:
    def __init__(self, data_endpoint: str, control_endpoint: str, ack: bool = True):
        self.data_endpoint, self.control_endpoint, self.ack = data_endpoint, control_endpoint, ack
        self.episodes: dict = {}  # episode_id -> Episode (first copy)
        self.receipts: Counter = Counter()  # episode_id -> times received on the wire
        self.ack_queries = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        assert self._ready.wait(10), "stand-in learner did not bind"
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)

    def _run(self):
        with DataReceiver(self.data_endpoint) as data, ControlServer(self.control_endpoint) as control:
            self._ready.set()
            while not self._stop.is_set():
                msg = data.recv(timeout_ms=10)
                if msg is not None and msg.kind == "episode":
                    ep = message_to_episode(msg)
                    self.receipts[ep.episode_id] += 1
                    self.episodes.setdefault(ep.episode_id, ep)
                got = control.poll(timeout_ms=10)
                if got is not None:
                    peer, req = got
                    if is_ack_request(req) and self.ack:
                        self.ack_queries += 1
                        control.reply(peer, ack_reply(req, set(self.episodes)), in_reply_to=req)
