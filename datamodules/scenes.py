"""Procedural indoor scenes ray-cast analytically: RGB, exact planar depth, camera-space normals, validity.

A box-shaped room (floor, ceiling, four walls) with axis-aligned boxes and spheres, textured and lit by a
point light, seen by a pinhole camera with random position, yaw and pitch. A window on one wall shows sky
and is invalid (like Hypersim's missing geometry). Deterministic per seed.

Conventions: depth is planar (along the optical axis) in metres; normals are unit vectors in the camera
frame with x pointing image-left, y up and z towards the viewer, always facing the camera (docs/method.md §4.1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

INF = np.float64(np.inf)


@dataclass
class Camera:
    """Pinhole camera: world-from-camera rotation (OpenCV axes: x right, y down, z forward) and position."""

    height: int
    width: int
    focal: float
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))
    position: np.ndarray = field(default_factory=lambda: np.zeros(3))

    def rays(self) -> np.ndarray:
        """World-space ray directions scaled so that the camera-space z component is 1 ([H, W, 3])."""
        v, u = np.mgrid[0 : self.height, 0 : self.width].astype(np.float64)
        x = (u + 0.5 - self.width / 2) / self.focal
        y = (v + 0.5 - self.height / 2) / self.focal
        cam = np.stack([x, y, np.ones_like(x)], axis=-1)
        return cam @ self.rotation.T


@dataclass
class Scene:
    """Geometry and appearance: room extents, boxes (min, max corners), spheres (centre, radius), light."""

    room_min: np.ndarray
    room_max: np.ndarray
    boxes: list[tuple[np.ndarray, np.ndarray]]
    spheres: list[tuple[np.ndarray, float]]
    colors: np.ndarray  # [num_surfaces, 3] base albedo: 6 room planes, then boxes, then spheres
    texture_scales: np.ndarray  # [num_surfaces]
    light: np.ndarray
    window: tuple[int, float, float, float, float] | None  # (wall plane index, u0, u1, v0, v1) in metres
    texture_kinds: np.ndarray | None = None  # [num_surfaces] 0 checker, 1 stripes, 2 noise; None = checker


def _look_rotation(yaw: float, pitch: float) -> np.ndarray:
    """World-from-camera rotation for a camera looking along +z (world y up) turned by yaw, tilted by pitch."""
    cy, sy, cp, sp = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
    forward = np.array([sy * cp, sp, cy * cp])
    right = np.array([cy, 0.0, -sy])
    down = np.cross(forward, right)
    return np.stack([right, down, forward], axis=1)


def random_scene(rng: np.random.Generator, height: int, width: int) -> tuple[Scene, Camera]:
    """Sample a room, its furniture, a light and a camera inside the room."""
    size = np.array([rng.uniform(4.0, 8.0), rng.uniform(2.5, 3.5), rng.uniform(5.0, 10.0)])
    room_min, room_max = np.array([-size[0] / 2, 0.0, 0.0]), np.array([size[0] / 2, size[1], size[2]])
    boxes = []
    for _ in range(rng.integers(2, 6)):
        extent = rng.uniform([0.4, 0.3, 0.4], [1.6, 1.8, 1.6])
        centre = np.array([rng.uniform(room_min[0] + 0.8, room_max[0] - 0.8), 0.0, rng.uniform(2.0, size[2] - 0.8)])
        lo = np.array([centre[0] - extent[0] / 2, 0.0, centre[2] - extent[2] / 2])
        boxes.append((lo, lo + extent))
    spheres = []
    for _ in range(rng.integers(1, 4)):
        radius = rng.uniform(0.25, 0.7)
        centre = np.array(
            [rng.uniform(room_min[0] + 1, room_max[0] - 1), rng.uniform(radius, 2.0), rng.uniform(2.0, size[2] - 1)]
        )
        spheres.append((centre, radius))
    surfaces = 6 + len(boxes) + len(spheres)
    colors = rng.uniform(0.25, 0.95, size=(surfaces, 3))
    texture_scales = rng.uniform(0.2, 0.8, size=surfaces)
    texture_kinds = rng.integers(0, 3, size=surfaces)
    light = np.array([rng.uniform(-1, 1), size[1] - 0.2, rng.uniform(1.0, size[2] - 1)])
    window = None
    if rng.random() < 0.8:
        wall = int(rng.choice([1, 5]))  # right wall (x = max) or far wall (z = max)
        span = size[2] if wall == 1 else size[0]
        base = 0.0 if wall == 1 else room_min[0]
        u0 = base + rng.uniform(0.1, 0.5) * span
        v0 = rng.uniform(0.8, 1.3)
        window = (wall, u0, u0 + rng.uniform(0.8, 2.0), v0, v0 + rng.uniform(0.8, 1.2))
    scene = Scene(room_min, room_max, boxes, spheres, colors, texture_scales, light, window, texture_kinds)
    fov = np.deg2rad(rng.uniform(50, 75))
    focal = 0.5 * width / np.tan(fov / 2)
    position = np.array([rng.uniform(-size[0] / 4, size[0] / 4), rng.uniform(1.2, 1.8), rng.uniform(0.2, 1.0)])
    rotation = _look_rotation(np.deg2rad(rng.uniform(-30, 30)), np.deg2rad(rng.uniform(-20, 5)))
    return scene, Camera(height, width, focal, rotation, position)


# Room planes (axis, at the max side?) in surface-id order: floor, +x wall, ceiling, -x wall, back wall, far wall.
_ROOM_PLANES = [(1, False), (0, True), (1, True), (0, False), (2, False), (2, True)]


def _hit_room(origin: np.ndarray, rays: np.ndarray, scene: Scene) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distance (in ray units), surface id and world normal of the room plane each ray leaves through."""
    t_best = np.full(rays.shape[:-1], INF)
    ids = np.full(rays.shape[:-1], -1)
    normals = np.zeros(rays.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        for index, (axis, at_max) in enumerate(_ROOM_PLANES):
            plane = scene.room_max[axis] if at_max else scene.room_min[axis]
            t = (plane - origin[axis]) / rays[..., axis]
            better = (t > 1e-9) & (t < t_best)
            t_best = np.where(better, t, t_best)
            ids = np.where(better, index, ids)
            normal = np.zeros(3)
            normal[axis] = -1.0 if at_max else 1.0
            normals[better] = normal
    return t_best, ids, normals


def _hit_box(origin: np.ndarray, rays: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Entry distance (inf if missed) and outward normal of an axis-aligned box (slab method)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t0 = (lo - origin) / rays
        t1 = (hi - origin) / rays
    t_small, t_large = np.minimum(t0, t1), np.maximum(t0, t1)
    t_small = np.nan_to_num(t_small, nan=-INF)
    t_large = np.nan_to_num(t_large, nan=INF)
    t_near, t_far = t_small.max(axis=-1), t_large.min(axis=-1)
    hit = (t_near <= t_far) & (t_near > 1e-9)
    axis = t_small.argmax(axis=-1)
    normals = np.zeros(rays.shape)
    sign = -np.sign(np.take_along_axis(rays, axis[..., None], axis=-1)[..., 0])
    np.put_along_axis(normals, axis[..., None], sign[..., None], axis=-1)
    return np.where(hit, t_near, INF), normals


def _hit_sphere(
    origin: np.ndarray, rays: np.ndarray, centre: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """Entry distance (inf if missed) and outward normal of a sphere."""
    oc = origin - centre
    a = (rays * rays).sum(-1)
    b = 2 * (rays @ oc)
    c = oc @ oc - radius**2
    disc = b * b - 4 * a * c
    with np.errstate(invalid="ignore"):
        t = (-b - np.sqrt(disc)) / (2 * a)
    t = np.where((disc >= 0) & (t > 1e-9), t, INF)
    points = origin + rays * np.where(np.isfinite(t), t, 0)[..., None]
    return t, (points - centre) / radius


# Fixed directions for the sum-of-sines "noise" texture (shared by all scenes; phases vary by position).
_NOISE_DIRECTIONS = np.random.default_rng(12345).normal(size=(5, 3)) * np.array([[1.0], [1.7], [2.9], [4.3], [6.1]])


def _texture(points: np.ndarray, ids: np.ndarray, scene: Scene) -> np.ndarray:
    """Procedural albedo: per-surface colour modulated by a 3-D checker, stripes or smooth noise."""
    scales = scene.texture_scales[ids][..., None]
    scaled = points / scales
    checker = 0.7 + 0.3 * (np.floor(scaled).sum(-1) % 2)
    stripes = 0.75 + 0.25 * np.sin(2 * np.pi * scaled @ np.array([0.8, 0.3, 0.5]))
    noise = 0.8 + 0.2 * np.sin(scaled @ _NOISE_DIRECTIONS.T).mean(-1) * 2
    kinds = np.zeros_like(ids) if scene.texture_kinds is None else scene.texture_kinds[ids]
    pattern = np.choose(kinds, [checker, stripes, noise])
    return scene.colors[ids] * pattern[..., None]


def render(scene: Scene, camera: Camera, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """Ray-cast the scene: rgb uint8 [H,W,3], depth float32 [H,W] (m), normals float32 [H,W,3], mask bool [H,W]."""
    rays = camera.rays()
    origin = camera.position
    t, ids, normals = _hit_room(origin, rays, scene)
    for k, (lo, hi) in enumerate(scene.boxes):
        t_box, n_box = _hit_box(origin, rays, lo, hi)
        closer = t_box < t
        t, ids = np.where(closer, t_box, t), np.where(closer, 6 + k, ids)
        normals = np.where(closer[..., None], n_box, normals)
    for k, (centre, radius) in enumerate(scene.spheres):
        t_sph, n_sph = _hit_sphere(origin, rays, centre, radius)
        closer = t_sph < t
        ids = np.where(closer, 6 + len(scene.boxes) + k, ids)
        t, normals = np.where(closer, t_sph, t), np.where(closer[..., None], n_sph, normals)
    points = origin + rays * t[..., None]
    # Face the camera (a ray can only see the side of a surface that points back at it).
    facing = (normals * rays).sum(-1) > 0
    normals[facing] *= -1

    valid = np.isfinite(t) & (ids >= 0)
    sky = np.zeros_like(valid)
    if scene.window is not None:
        wall, u0, u1, v0, v1 = scene.window
        u = points[..., 2] if wall == 1 else points[..., 0]
        sky = (ids == wall) & (u > u0) & (u < u1) & (points[..., 1] > v0) & (points[..., 1] < v1)
        valid &= ~sky

    to_light = scene.light - points
    distance = np.linalg.norm(to_light, axis=-1, keepdims=True)
    lambert = np.clip((normals * to_light / np.maximum(distance, 1e-6)).sum(-1, keepdims=True), 0, None)
    shading = 0.25 + 1.6 * lambert / (1 + 0.08 * distance**2)
    color = _texture(points, np.maximum(ids, 0), scene) * shading
    elevation = np.clip(-rays[..., 1] / np.linalg.norm(rays, axis=-1), -1, 1)[..., None]
    sky_color = np.array([0.55, 0.75, 1.0]) * (0.85 + 0.3 * elevation) + 0.1
    color = np.where(sky[..., None], sky_color, color)
    if rng is not None:
        color = color + rng.normal(0, 0.01, size=color.shape)
    rgb = (np.clip(color, 0, 1) ** (1 / 2.2) * 255 + 0.5).astype(np.uint8)

    depth = np.where(valid, t, 0.0).astype(np.float32)  # t is in units of the z=1 ray, i.e. planar depth
    camera_normals = normals @ camera.rotation  # world -> camera (OpenCV axes)
    out_normals = np.where(valid[..., None], -camera_normals, 0.0).astype(np.float32)  # -> x left, y up, z out
    return {"rgb": rgb, "depth": depth, "normals": out_normals, "mask": valid}


def generate_scene(seed: int, height: int, width: int) -> dict[str, np.ndarray | float]:
    """One random scene rendered at height x width; also returns the focal length in pixels."""
    rng = np.random.default_rng(seed)
    scene, camera = random_scene(rng, height, width)
    sample = render(scene, camera, rng)
    sample["focal"] = float(camera.focal)
    return sample
