"""Hardware backends import and fail fast, with a clear message, when no hardware is there."""
import socket
import time

import pytest

from realrobot.arm import RobotUnreachableError, check_reachable, make_arm
from realrobot.camera import CameraNotFoundError, make_camera
from realrobot.teleop import TeleopDeviceError, make_teleop

FAIL_FAST_S = 3.0


def closed_local_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_franky_arm_unreachable_fails_fast_naming_the_ip():
    port = closed_local_port()
    arm = make_arm({"type": "franky", "ip": "127.0.0.1", "reachability_ports": [port],
                    "reachability_timeout_s": 0.5, "realtime": False})
    t0 = time.monotonic()
    with pytest.raises(RobotUnreachableError, match=r"127\.0\.0\.1"):
        arm.connect()
    assert time.monotonic() - t0 < FAIL_FAST_S
    assert not arm.is_connected


def test_franky_host_without_fci_fails_fast():
    """The reachability probe answers (a listening port) but nothing serves FCI (port 1337 closed
    on loopback): libfranka's refusal comes back at once as RobotUnreachableError."""
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 1337)) == 0:
            pytest.skip("something listens on 127.0.0.1:1337")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        arm = make_arm({"type": "franky", "ip": "127.0.0.1", "reachability_ports": [server.getsockname()[1]],
                        "realtime": False})
        t0 = time.monotonic()
        with pytest.raises((RobotUnreachableError, RuntimeError), match=r"127\.0\.0\.1|realtime"):
            arm.connect()
        assert time.monotonic() - t0 < FAIL_FAST_S


def test_reachability_check_passes_for_a_listening_port():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        check_reachable("127.0.0.1", [closed_local_port(), server.getsockname()[1]], timeout_s=0.5)


def test_franky_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown keys"):
        make_arm({"type": "franky", "ipp": "127.0.0.1"})


def test_realsense_without_device_fails_fast():
    from realrobot.camera_realsense import attached_serials
    if attached_serials():
        pytest.skip("a RealSense is attached")
    cam = make_camera({"type": "realsense", "serial": "000000000000"})
    t0 = time.monotonic()
    with pytest.raises(CameraNotFoundError, match="no RealSense camera is attached"):
        cam.connect()
    assert time.monotonic() - t0 < FAIL_FAST_S
    assert not cam.is_connected


def test_spacemouse_without_driver_says_what_to_install():
    try:
        import pyspacemouse  # noqa: F401
        pytest.skip("pyspacemouse is installed")
    except ImportError:
        pass
    try:
        import hid  # noqa: F401
        pytest.skip("hidapi is installed")
    except ImportError:
        pass
    teleop = make_teleop({"type": "spacemouse"})
    with pytest.raises(TeleopDeviceError, match="pyspacemouse"):
        teleop.connect()


def test_unknown_backend_types_are_refused():
    with pytest.raises(ValueError, match="unknown arm type"):
        make_arm({"type": "ur5"})
    with pytest.raises(ValueError, match="unknown camera type"):
        make_camera({"type": "zed"})
    with pytest.raises(ValueError, match="needs the SimCell"):
        make_arm({"type": "sim"})


def test_collect_command_reports_a_missing_robot_in_one_line(tmp_path, caplog):
    from realrobot import collector
    port = closed_local_port()
    t0 = time.monotonic()
    rc = collector.main(["robot=franky", "robot.arm.ip=127.0.0.1", f"robot.arm.reachability_ports=[{port}]",
                         "collect.task=put the red cube into the bowl", f"run_dir={tmp_path}"])
    assert rc == 2 and time.monotonic() - t0 < FAIL_FAST_S
    assert "RobotUnreachableError" in caplog.text and "127.0.0.1" in caplog.text
    assert not (tmp_path / "real_demos").exists()  # nothing recorded, nothing half-created


def test_collect_on_the_real_cell_needs_a_task(tmp_path, capsys):
    from realrobot import collector
    assert collector.main(["robot=franky", f"run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "set collect.task" in err and "Traceback" not in err
