"""An Intel RealSense colour stream through pyrealsense2.

``connect`` looks at the attached devices first: with none, or not the configured serial, it
raises CameraNotFoundError at once (``pipeline.start()`` alone takes about 15 s to fail).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np

from realrobot.camera import Camera, CameraConfig, CameraNotFoundError

log = logging.getLogger(__name__)


@dataclass
class RealSenseCameraConfig(CameraConfig):
    type = "realsense"
    serial: Optional[str] = None  # None: the only attached device (error if several)
    width: int = 640
    height: int = 480
    fps: int = 30
    exposure_us: Optional[float] = None  # None: auto exposure
    gain: Optional[float] = None
    frame_timeout_ms: int = 1000
    warmup_frames: int = 15  # dropped after start while auto exposure settles


def attached_serials() -> list[str]:
    import pyrealsense2 as rs
    return [d.get_info(rs.camera_info.serial_number) for d in rs.context().query_devices()]


class RealSenseCamera(Camera):
    config_class = RealSenseCameraConfig
    name = "realsense"

    def __init__(self, config: RealSenseCameraConfig):
        super().__init__(config)
        self.pipeline = None
        self.serial: Optional[str] = None

    @property
    def is_connected(self) -> bool:
        return self.pipeline is not None

    @property
    def image_size(self) -> tuple[int, int]:
        return self.config.height, self.config.width

    def _pick_serial(self) -> str:
        serials = attached_serials()
        want = self.config.serial
        if not serials:
            raise CameraNotFoundError("no RealSense camera is attached (pyrealsense2 query_devices() "
                                      "is empty): check the USB 3 cable")
        if want is None:
            if len(serials) > 1:
                raise CameraNotFoundError(f"several RealSense cameras attached {serials}: "
                                          "set robot.camera.serial")
            return serials[0]
        if str(want) not in serials:
            raise CameraNotFoundError(f"RealSense serial {want} is not attached (attached: {serials})")
        return str(want)

    def connect(self) -> None:
        import pyrealsense2 as rs
        c = self.config
        self.serial = self._pick_serial()
        pipeline, rs_config = rs.pipeline(), rs.config()
        rs_config.enable_device(self.serial)
        rs_config.enable_stream(rs.stream.color, c.width, c.height, rs.format.rgb8, c.fps)
        profile = pipeline.start(rs_config)
        sensor = profile.get_device().first_color_sensor()
        if c.exposure_us is not None:
            sensor.set_option(rs.option.enable_auto_exposure, 0)
            sensor.set_option(rs.option.exposure, float(c.exposure_us))
        if c.gain is not None:
            sensor.set_option(rs.option.gain, float(c.gain))
        self.pipeline = pipeline
        for _ in range(c.warmup_frames):
            pipeline.wait_for_frames(c.frame_timeout_ms)
        log.info("RealSense %s streaming %dx%d@%d", self.serial, c.width, c.height, c.fps)

    def read(self) -> np.ndarray:
        self._require_connected()
        frames = self.pipeline.wait_for_frames(self.config.frame_timeout_ms)
        color = frames.get_color_frame()
        return np.asanyarray(color.get_data()).copy()

    def disconnect(self) -> None:
        if self.pipeline is not None:
            try:
                self.pipeline.stop()
            finally:
                self.pipeline = None
