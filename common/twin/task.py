"""TandemPickPlace-v1: the ManiSkill3 twin of the real cell.

A Franka Panda at a table puts one graspable object (cube, cylinder or ball, in one of several
colours) into a bowl, following the instruction "put the <colour> <shape> into the bowl".
The camera, layout, action bounds, control rate and randomisation all come from the env config
(``configs/env/twin.yaml``); ``real_proxy=True`` applies the config's fixed ``real_proxy_shift``.

Written batched over ``num_envs`` as ManiSkill3 tasks are. Per-episode variety without
reconfiguration: every sub-scene holds one body of each shape; the episode's shape is placed on
the table and the others are parked far away, and its colour is a per-sub-scene render material.
Mass and friction are resampled per episode on physx_cpu; on GPU PhysX (where they are frozen
after initialisation) they are sampled when the scene is built, i.e. at each reconfiguration.

Randomisation (``randomization.enabled`` and not real proxy): lighting, camera pose jitter,
object mass and friction, control latency. Always varied (the task itself): object shape and
colour, object and bowl poses, robot start pose noise.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

import numpy as np
import sapien
import sapien.physx as physx
import torch
from omegaconf import DictConfig, OmegaConf
from transforms3d.euler import euler2quat

from mani_skill.agents.robots import Panda
from mani_skill.envs.sapien_env import BaseEnv
from mani_skill.sensors.camera import CameraConfig
from mani_skill.utils import common as ms_common
from mani_skill.utils import sapien_utils
from mani_skill.utils.registration import register_env
from mani_skill.utils.structs.actor import Actor
from mani_skill.utils.structs.pose import Pose

from common.segment import camera_hw

TASK_ID = "TandemPickPlace-v1"
DEFAULT_CFG_PATH = Path(__file__).resolve().parents[2] / "configs" / "env" / "twin.yaml"
SHAPES = ("cube", "cylinder", "sphere")
GRIPPER_OPEN = 1.0


def load_default_cfg() -> dict:
    return OmegaConf.to_container(OmegaConf.load(DEFAULT_CFG_PATH), resolve=True)


def to_dict(cfg: Any) -> dict:
    """The env config as a fresh plain dict (None: configs/env/twin.yaml); a top-level
    ``image_size: [H, W]`` overrides ``camera.height/width``."""
    if cfg is None:
        cfg = load_default_cfg()
    elif isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    else:
        cfg = copy.deepcopy(dict(cfg))
    cfg["camera"]["height"], cfg["camera"]["width"] = camera_hw(cfg)
    return cfg


def _rpy_pose(p, rpy) -> sapien.Pose:
    return sapien.Pose(p=list(p), q=list(euler2quat(*rpy)))


def _upright(p=(0.0, 0.0, 0.0)) -> sapien.Pose:
    # SAPIEN cylinders lie along x; rotate them to stand along z
    return sapien.Pose(p=list(p), q=list(euler2quat(0.0, np.pi / 2, 0.0)))


def _panda_class(action_cfg: dict) -> type:
    """The Panda with the configured pd_ee_delta_pose bounds, in env units (not normalised).

    The env clips each arm component to these bounds itself (per axis); ManiSkill's normalised
    rotation path scales by ``rot_lower`` and would flip the sign."""
    max_pos, max_rot = float(action_cfg["max_delta_pos"]), float(action_cfg["max_delta_rot"])

    class TandemPanda(Panda):
        uid = "tandem_panda"

        @property
        def _controller_configs(self):
            cfgs = super()._controller_configs
            for mode in ("pd_ee_delta_pose", "pd_ee_target_delta_pose"):
                arm = cfgs[mode]["arm"]
                arm.pos_lower, arm.pos_upper = -max_pos, max_pos
                arm.rot_lower, arm.rot_upper = -max_rot, max_rot
                arm.normalize_action = False
            return cfgs

    return TandemPanda


@register_env(TASK_ID, max_episode_steps=100)
class TandemPickPlaceEnv(BaseEnv):
    SUPPORTED_ROBOTS = None  # the agent is a config-built Panda subclass, see _panda_class
    SUPPORTED_REWARD_MODES = ("sparse", "dense", "normalized_dense", "none")
    agent: Panda

    def __init__(self, *args, tandem_cfg: Any = None, real_proxy: Optional[bool] = None, **kwargs):
        cfg = to_dict(tandem_cfg)
        if real_proxy is not None:
            cfg["real_proxy"] = bool(real_proxy)
        self.cfg = cfg
        self.is_real_proxy = bool(cfg["real_proxy"])
        self.shift = cfg["real_proxy_shift"] if self.is_real_proxy else None
        self.randomize = bool(cfg["randomization"]["enabled"]) and not self.is_real_proxy
        self.shape_keys = [s for s in cfg["object"]["shapes"] if s in SHAPES]
        unknown = set(cfg["object"]["shapes"]) - set(SHAPES)
        if unknown:
            raise ValueError(f"unknown object shapes {sorted(unknown)}; known: {SHAPES}")
        self.color_names = list(cfg["object"]["colors"])
        self.obj_half = float(cfg["object"]["half_size"])
        b = cfg["bowl"]
        self.bowl_inner_radius = float(b["inner_radius"])
        self.bowl_base = float(b["base_thickness"])
        self.bowl_height = float(b["wall_height"])
        kwargs.setdefault("sim_config", dict(sim_freq=int(cfg["sim_freq"]), control_freq=int(cfg["control_freq"])))
        kwargs.setdefault("control_mode", cfg["action"]["controller"])
        kwargs.setdefault("reward_mode", cfg.get("reward_mode", "sparse"))
        super().__init__(*args, robot_uids=_panda_class(cfg["action"]), **kwargs)

    # ------------------------------------------------------------------ scene
    @property
    def _default_sensor_configs(self):
        c = self.cfg["camera"]
        intrinsic = None if c.get("intrinsic") is None else np.asarray(c["intrinsic"], dtype=np.float64)
        fov = None if intrinsic is not None else float(c["fov_y"]) * (self.shift["fov_scale"] if self.shift else 1.0)
        return [CameraConfig(c["uid"], self.camera_base_pose(), int(c["width"]), int(c["height"]), fov=fov,
                             near=float(c["near"]), far=float(c["far"]), intrinsic=intrinsic, shader_pack=c["shader"])]

    @property
    def _default_human_render_camera_configs(self):
        c = self.cfg["camera"]
        return CameraConfig("render_camera", self.camera_base_pose(), 512, 512, fov=float(c["fov_y"]),
                            near=float(c["near"]), far=float(c["far"]))

    def camera_base_pose(self) -> sapien.Pose:
        """Nominal camera-to-world pose (before per-episode jitter)."""
        c = self.cfg["camera"]
        if c.get("pose_p") is not None and c.get("pose_q") is not None:
            pose = sapien.Pose(p=list(c["pose_p"]), q=list(c["pose_q"]))
        else:
            pose = sapien_utils.look_at(eye=c["eye"], target=c["target"]).sp
        if self.shift:
            pose = sapien.Pose(p=pose.p + np.asarray(self.shift["camera_pos_offset"]), q=pose.q)
            pose = pose * _rpy_pose((0, 0, 0), self.shift["camera_rot_offset"])
        return pose

    def _load_agent(self, options: dict):
        super()._load_agent(options, sapien.Pose(p=list(self.cfg["robot"]["base_pose"])))

    def _scene_color(self, key: str) -> list:
        rgb = self.shift[key] if self.shift else self.cfg["scene"][key]
        return [*rgb, 1.0]

    def _static_box(self, name, half_size, pose, color, collision=True) -> Actor:
        builder = self.scene.create_actor_builder()
        if collision:
            builder.add_box_collision(half_size=half_size)
        builder.add_box_visual(half_size=half_size, material=sapien.render.RenderMaterial(base_color=color))
        builder.initial_pose = pose
        return builder.build_static(name=name)

    def _load_scene(self, options: dict):
        s = self.cfg["scene"]
        tx, ty = s["table_center"]
        lx, ly = s["table_size"]
        h = float(s["table_height"])
        self.table = self._static_box("table", [lx / 2, ly / 2, h / 2], sapien.Pose(p=[tx, ty, -h / 2]),
                                      self._scene_color("table_color"))
        self.floor = self._static_box("floor", [4.0, 4.0, 0.01], sapien.Pose(p=[0, 0, -h - 0.01]),
                                      self._scene_color("floor_color"))
        self.wall = self._static_box("wall", [0.01, 4.0, 1.5], sapien.Pose(p=[s["wall_x"], 0, -h + 1.5]),
                                     self._scene_color("wall_color"), collision=False)
        self.bowl = self._build_bowl()
        self._build_objects()
        n = self.num_envs
        # inactive shapes rest on the floor behind the camera, out of view
        self.parking = torch.tensor([[3.0 + 0.3 * k, 3.0, self.obj_half - h] for k in range(len(self.shape_keys))],
                                    device=self.device)
        self.shape_idx = torch.zeros(n, dtype=torch.long, device=self.device)
        self.color_idx = torch.zeros(n, dtype=torch.long, device=self.device)
        self.latency = torch.zeros(n, dtype=torch.long, device=self.device)
        max_latency = max(self._latency_range()) if self._latency_range() else 0
        self.action_buffer = torch.zeros(n, max_latency + 1, 7, device=self.device)
        self.grasped_once = torch.zeros(n, dtype=torch.bool, device=self.device)
        self.instructions = [""] * n

    def _build_bowl(self) -> Actor:
        b = self.cfg["bowl"]
        r, t, hgt, base = self.bowl_inner_radius, float(b["wall_thickness"]), self.bowl_height, self.bowl_base
        k = int(b["num_walls"])
        mat = physx.PhysxMaterial(b["friction"], b["friction"], 0.0)
        vis = sapien.render.RenderMaterial(base_color=[*b["color"], 1.0])
        builder = self.scene.create_actor_builder()
        base_pose = _upright((0, 0, base / 2))
        builder.add_cylinder_collision(base_pose, radius=r + t, half_length=base / 2, material=mat)
        builder.add_cylinder_visual(base_pose, radius=r + t, half_length=base / 2, material=vis)
        r_mid = r + t / 2
        # slabs slightly longer than the chord so neighbours overlap and leave no gaps
        half_len = r_mid * np.tan(np.pi / k) * 1.1
        for i in range(k):
            a = 2 * np.pi * i / k
            pose = sapien.Pose(p=[r_mid * np.cos(a), r_mid * np.sin(a), base + hgt / 2], q=list(euler2quat(0, 0, a)))
            half = [t / 2, half_len, hgt / 2]
            builder.add_box_collision(pose, half_size=half, material=mat)
            builder.add_box_visual(pose, half_size=half, material=vis)
        volume = np.pi * (r + t) ** 2 * base + k * 8 * half[0] * half[1] * half[2]
        # density applies per shape; set it so the whole bowl weighs bowl.mass
        for rec in builder.collision_records:
            rec.density = float(b["mass"]) / volume
        builder.initial_pose = sapien.Pose(p=[0.3, 0.3, 0.0])
        return builder.build(name="bowl")

    def _shape_geometry(self, builder, shape: str, material, color):
        a = self.obj_half
        vis = sapien.render.RenderMaterial(base_color=color)
        if shape == "cube":
            builder.add_box_collision(half_size=[a] * 3, material=material)
            builder.add_box_visual(half_size=[a] * 3, material=vis)
            volume = 8 * a**3
        elif shape == "cylinder":
            builder.add_cylinder_collision(_upright(), radius=a, half_length=a, material=material)
            builder.add_cylinder_visual(_upright(), radius=a, half_length=a, material=vis)
            volume = np.pi * a**2 * 2 * a
        else:
            builder.add_sphere_collision(radius=a, material=material)
            builder.add_sphere_visual(radius=a, material=vis)
            volume = 4 / 3 * np.pi * a**3
        return vis, volume

    def _build_objects(self):
        """One body per shape per sub-scene, each with its own render material (per-env colour)."""
        self.objects: list[Actor] = []
        self.object_materials: list[list[sapien.render.RenderMaterial]] = []
        self._base_inertia: list[list[np.ndarray]] = []
        for k, shape in enumerate(self.shape_keys):
            per_env, mats = [], []
            for i in range(self.num_envs):
                mass, friction = self._sample_dynamics(self._batched_episode_rng[i])
                builder = self.scene.create_actor_builder()
                pmat = physx.PhysxMaterial(friction, friction, 0.0)
                vis, volume = self._shape_geometry(builder, shape, pmat, [1.0, 1.0, 1.0, 1.0])
                for rec in builder.collision_records:
                    rec.density = mass / volume
                builder.set_scene_idxs([i])
                builder.initial_pose = sapien.Pose(p=[3.0 + 0.3 * k, 3.0 + 0.3 * i, 1.0])
                per_env.append(builder.build(name=f"object_{shape}_{i}"))
                mats.append(vis)
            actor = Actor.merge(per_env, name=f"object_{shape}") if self.num_envs > 1 else per_env[0]
            self.objects.append(actor)
            self.object_materials.append(mats)
            self._base_inertia.append([np.array(b.inertia) / b.mass for b in actor._bodies])

    def _sample_dynamics(self, rng: np.random.RandomState) -> tuple[float, float]:
        o, r = self.cfg["object"], self.cfg["randomization"]
        if self.shift:
            return float(o["mass"]) * float(self.shift["mass_scale"]), float(self.shift["friction"])
        if not self.randomize:
            return float(o["mass"]), float(o["friction"])
        return float(o["mass"]) * rng.uniform(*r["mass_scale"]), float(rng.uniform(*r["friction_range"]))

    def _latency_range(self) -> list[int]:
        if self.shift:
            return [int(self.shift["latency_steps"])] * 2
        if not self.randomize:
            return [0, 0]
        return [int(v) for v in self.cfg["randomization"]["latency_steps"]]

    def _load_lighting(self, options: dict):
        s = self.cfg["scene"]
        self.lights: list[list[sapien.render.RenderDirectionalLightComponent]] = []
        self.light_base = [np.asarray(l["color"], dtype=np.float32) for l in s["lights"]]
        if self.shift:
            self.light_base = [c * np.asarray(self.shift["light_scale"], dtype=np.float32) for c in self.light_base]
        self.ambient_base = np.asarray(self.shift["ambient_light"] if self.shift else s["ambient_light"], np.float32)
        for sub in self.scene.sub_scenes:
            comps = []
            for spec, color in zip(s["lights"], self.light_base):
                entity = sapien.Entity()
                light = sapien.render.RenderDirectionalLightComponent()
                entity.add_component(light)
                light.color = color.tolist()
                light.shadow = bool(s["shadows"])
                light.pose = sapien.Pose([0, 0, 0], sapien.math.shortest_rotation([1, 0, 0], spec["direction"]))
                sub.add_entity(entity)
                comps.append(light)
            sub.render_system.ambient_light = self.ambient_base.tolist()
            self.lights.append(comps)

    # ------------------------------------------------------------------ episode
    def _initialize_episode(self, env_idx: torch.Tensor, options: dict):
        with torch.device(self.device):
            idx = ms_common.to_numpy(env_idx).astype(int)
            self._init_robot(env_idx)
            obj_xyz = torch.zeros(len(idx), 3)
            obj_q = torch.zeros(len(idx), 4)
            bowl_xyz = torch.zeros(len(idx), 3)
            for j, i in enumerate(idx):
                rng = self._batched_episode_rng[int(i)]
                self.shape_idx[i] = int(rng.randint(len(self.shape_keys)))
                self.color_idx[i] = int(rng.randint(len(self.color_names)))
                (ox, oy), (bx, by) = self._sample_layout(rng)
                yaw = rng.uniform(-np.pi, np.pi) if self.cfg["layout"]["object_yaw"] else 0.0
                obj_xyz[j] = torch.tensor([ox, oy, self.obj_half])
                obj_q[j] = torch.tensor(euler2quat(0, 0, yaw), dtype=torch.float32)
                bowl_xyz[j] = torch.tensor([bx, by, 0.0])
                self._apply_appearance(int(i), rng)
                lat = self._latency_range()
                self.latency[i] = int(rng.randint(lat[0], lat[1] + 1))
                shape, color = self.shape_keys[self.shape_idx[i]], self.color_names[self.color_idx[i]]
                self.instructions[i] = self.cfg["object"]["instruction"].format(
                    color=color, shape=self.cfg["object"]["shapes"][shape])
            self.bowl.set_pose(Pose.create_from_pq(bowl_xyz))
            sel = self.shape_idx[env_idx]
            for k, actor in enumerate(self.objects):
                active = sel == k
                p = torch.where(active[:, None], obj_xyz.to(self.device), self.parking[k].expand(len(idx), 3))
                q = torch.where(active[:, None], obj_q.to(self.device), torch.tensor([1.0, 0, 0, 0]).expand(len(idx), 4))
                actor.set_pose(Pose.create_from_pq(p, q))
            hold = torch.zeros(7)
            hold[6] = GRIPPER_OPEN
            self.action_buffer[env_idx] = hold
            self.grasped_once[env_idx] = False

    def _init_robot(self, env_idx: torch.Tensor):
        r = self.cfg["robot"]
        qpos0 = torch.tensor(r["init_qpos"], dtype=torch.float32)
        noise = torch.zeros(len(env_idx), qpos0.numel())
        rng = self._batched_episode_rng[env_idx]
        noise[:, :7] = torch.from_numpy(rng.normal(0, float(r["init_qpos_noise"]), size=7).astype(np.float32))
        self.agent.reset(qpos0 + noise)
        self.agent.robot.set_pose(sapien.Pose(p=list(r["base_pose"])))

    def _sample_layout(self, rng: np.random.RandomState):
        lay = self.cfg["layout"]
        bowl = np.array([rng.uniform(*lay["bowl_x"]), rng.uniform(*lay["bowl_y"])])
        for _ in range(100):
            obj = np.array([rng.uniform(*lay["object_x"]), rng.uniform(*lay["object_y"])])
            if np.linalg.norm(obj - bowl) >= lay["min_separation"]:
                break
        return obj, bowl

    def _apply_appearance(self, i: int, rng: np.random.RandomState):
        """Object colour, lighting, camera jitter and (physx_cpu) dynamics for sub-scene ``i``."""
        r = self.cfg["randomization"]
        rgb = self.cfg["object"]["colors"][self.color_names[self.color_idx[i]]]
        self.object_materials[int(self.shape_idx[i])][i].base_color = [*rgb, 1.0]
        light_scale, ambient_scale = np.ones(3, np.float32), 1.0
        cam_pose = self.camera_base_pose()
        if self.randomize:
            light_scale = rng.uniform(*r["light_scale"]) + rng.uniform(-r["light_tint"], r["light_tint"], 3)
            ambient_scale = rng.uniform(*r["ambient_scale"])
            cam_pose = cam_pose * _rpy_pose(rng.uniform(-r["camera_pos_noise"], r["camera_pos_noise"], 3),
                                            rng.uniform(-r["camera_rot_noise"], r["camera_rot_noise"], 3))
        if hasattr(self, "lights"):
            for light, base in zip(self.lights[i], self.light_base):
                light.color = np.clip(base * light_scale, 0, None).tolist()
            self.scene.sub_scenes[i].render_system.ambient_light = np.clip(self.ambient_base * ambient_scale, 0, 1).tolist()
        sensor = self.scene.sensors.get(self.cfg["camera"]["uid"]) if hasattr(self.scene, "sensors") else None
        if sensor is not None:
            sensor.camera._render_cameras[i].local_pose = cam_pose
            sensor.camera._cached_local_pose = None
        if not self.gpu_sim_enabled and self.randomize:
            mass, friction = self._sample_dynamics(rng)
            k = int(self.shape_idx[i])
            body = self.objects[k]._bodies[i]
            body.mass = mass
            body.inertia = (self._base_inertia[k][i] * mass).tolist()
            material = physx.PhysxMaterial(friction, friction, 0.0)
            for shape in body.collision_shapes:
                shape.set_physical_material(material)

    # ------------------------------------------------------------------ state
    def _gather(self, values: torch.Tensor) -> torch.Tensor:
        """[K, N, ...] per-shape values -> [N, ...] of each env's active shape."""
        return values[self.shape_idx, torch.arange(self.num_envs, device=self.device)]

    @property
    def obj_pose(self) -> Pose:
        return Pose.create(self._gather(torch.stack([a.pose.raw_pose for a in self.objects])))

    @property
    def obj_linear_velocity(self) -> torch.Tensor:
        return self._gather(torch.stack([a.linear_velocity for a in self.objects]))

    @property
    def active_shape(self) -> list[str]:
        return [self.shape_keys[int(k)] for k in self.shape_idx]

    def set_object_pose(self, pose: Pose) -> None:
        """Move each env's active object to ``pose`` (world frame) and stop it; for tests and scripted set-ups."""
        pose = Pose.create(pose)
        for k, actor in enumerate(self.objects):
            active = (self.shape_idx == k)[:, None]
            raw = torch.where(active, pose.raw_pose.to(self.device).expand(self.num_envs, 7), actor.pose.raw_pose)
            actor.set_pose(Pose.create(raw))
            actor.set_linear_velocity(torch.zeros(self.num_envs, 3, device=self.device))
            actor.set_angular_velocity(torch.zeros(self.num_envs, 3, device=self.device))

    def gripper_opening(self) -> torch.Tensor:
        """Distance between the fingers, metres [N]."""
        return self.agent.robot.get_qpos()[:, -2:].sum(dim=1)

    def proprio(self) -> torch.Tensor:
        """[N, 8]: tcp position (3), tcp quaternion wxyz (4), gripper opening (1), in the robot
        base frame, as franky reports the real arm's end-effector pose."""
        tcp = self.agent.robot.pose.inv() * self.agent.tcp_pose
        return torch.cat([tcp.p, tcp.q, self.gripper_opening()[:, None]], dim=1).float()

    def privileged(self) -> torch.Tensor:
        """[N, 6]: object and bowl centre positions in the robot base frame. Simulator-only labels
        (sim demos store them as ``observation.environment_state`` for the policy's auxiliary loss)."""
        base = self.agent.robot.pose.inv()
        return torch.cat([(base * self.obj_pose).p, (base * self.bowl.pose).p], dim=1).float()

    def is_grasping_object(self) -> torch.Tensor:
        """[N] bool. Contact queries only for shapes active in some env (one on physx_cpu)."""
        flags = torch.zeros(len(self.objects), self.num_envs, dtype=torch.bool, device=self.device)
        for k in torch.unique(self.shape_idx).tolist():
            flags[k] = self.agent.is_grasping(self.objects[k])
        return self._gather(flags)

    def evaluate(self):
        obj_p, bowl_p = self.obj_pose.p, self.bowl.pose.p
        rel = obj_p - bowl_p
        radial = torch.linalg.norm(rel[:, :2], dim=1)
        s = self.cfg["success"]
        inside = (radial <= self.bowl_inner_radius - float(s["rim_margin"])) & (rel[:, 2] > self.bowl_base) \
            & (rel[:, 2] < self.bowl_base + self.bowl_height + 2 * self.obj_half)
        at_rest = torch.linalg.norm(self.obj_linear_velocity, dim=1) <= float(s["max_speed"])
        is_grasped = self.is_grasping_object()
        self.last_is_grasped = is_grasped
        return dict(success=inside & at_rest & ~is_grasped, is_obj_in_bowl=inside, is_obj_at_rest=at_rest,
                    is_grasped=is_grasped)

    def _get_obs_extra(self, info: dict):
        obs = dict(tcp_pose=self.agent.tcp_pose.raw_pose, gripper_opening=self.gripper_opening()[:, None])
        if self.obs_mode_struct.use_state:
            obs.update(obj_pose=self.obj_pose.raw_pose, bowl_pos=self.bowl.pose.p,
                       is_grasped=info["is_grasped"][:, None].float())
        return obs

    # ------------------------------------------------------------------ action
    def _step_action(self, action):
        if action is not None and not isinstance(action, dict):
            action = ms_common.to_tensor(action, device=self.device).float()
            if action.ndim == 1:
                action = action[None].expand(self.num_envs, -1)
            a = self.cfg["action"]
            action = torch.cat([action[:, :3].clamp(-a["max_delta_pos"], a["max_delta_pos"]),
                                action[:, 3:6].clamp(-a["max_delta_rot"], a["max_delta_rot"]),
                                action[:, 6:7].clamp(-1.0, 1.0)], dim=1)
            # control latency: the command applied now is the one given `latency` steps ago
            self.action_buffer = torch.roll(self.action_buffer, 1, dims=1)
            self.action_buffer[:, 0] = action
            action = self.action_buffer[torch.arange(self.num_envs, device=self.device), self.latency]
        return super()._step_action(action)

    # ------------------------------------------------------------------ reward
    def compute_sparse_reward(self, obs: Any, action: torch.Tensor, info: dict):
        rw = self.cfg["reward"]
        first_grasp = info["is_grasped"] & ~self.grasped_once
        self.grasped_once |= info["is_grasped"]
        return rw["success"] * info["success"].float() + rw["first_grasp_bonus"] * first_grasp.float()

    def compute_dense_reward(self, obs: Any, action: torch.Tensor, info: dict):
        """Staged shaping: reach (<=1), grasp (+1), carry above the bowl (<=1), release inside (+1),
        success (5 in all)."""
        tcp = self.agent.tcp_pose.p
        obj = self.obj_pose.p
        bowl = self.bowl.pose.p
        reach = 1 - torch.tanh(5 * torch.linalg.norm(obj - tcp, dim=1))
        grasped = info["is_grasped"].float()
        above = bowl + torch.tensor([0, 0, self.bowl_base + self.bowl_height + 2 * self.obj_half], device=self.device)
        carry = (1 - torch.tanh(5 * torch.linalg.norm(above - obj, dim=1))) * grasped
        inside = info["is_obj_in_bowl"].float()
        reward = reach * (1 - inside) + grasped + carry + 3 * inside * (1 - grasped)
        reward[info["success"]] = 5.0
        return reward

    def compute_normalized_dense_reward(self, obs: Any, action: torch.Tensor, info: dict):
        return self.compute_dense_reward(obs=obs, action=action, info=info) / 5.0
