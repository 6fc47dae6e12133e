"""Real-robot side of Tandem: arm, camera and teleoperation backends, each with a simulated
counterpart on the real-proxy twin; the safety layer; `tandem-collect` and `tandem-deploy`.

    make_arm(cfg.robot.arm, cell)       -> Arm       (franky | sim)
    make_camera(cfg.robot.camera, cell) -> Camera    (realsense | sim)
    make_teleop(cfg.teleop, cell)       -> Teleop    (keyboard | spacemouse | scripted)
    make_rig(cfg.robot, cfg.env)        -> Rig(arm, camera, cell): the sim backends share one SimCell
    SafetyLayer(arm, cfg.robot.safety)  -> .send(action, state) between any command and the arm

This package imports ``common`` and third-party code only, never ``actors`` or ``learner``.
Hardware libraries (franky, pyrealsense2, pynput, pyspacemouse) are imported when a backend connects.
"""
from realrobot.arm import Arm, ArmConfig, RobotUnreachableError, make_arm
from realrobot.camera import Camera, CameraConfig, CameraNotFoundError, make_camera
from realrobot.rig import Rig, make_rig
from realrobot.safety import SafetyConfig, SafetyLayer, SafetyViolation
from realrobot.teleop import Teleop, TeleopConfig, TeleopDeviceError, TeleopEvents, make_teleop

__all__ = ["Arm", "ArmConfig", "RobotUnreachableError", "make_arm", "Camera", "CameraConfig",
           "CameraNotFoundError", "make_camera", "Rig", "make_rig", "SafetyConfig", "SafetyLayer",
           "SafetyViolation", "Teleop", "TeleopConfig", "TeleopDeviceError", "TeleopEvents", "make_teleop"]
