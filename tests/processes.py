"""Test helper: stop a spawned Tandem process the way tandem-run does (SIGTERM, then SIGKILL)."""
import signal
import subprocess


def stop(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
