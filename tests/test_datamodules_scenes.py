"""The procedural scene generator: determinism, planar depth, normal convention."""

import numpy as np

from datamodules.scenes import Camera, Scene, _look_rotation, generate_scene, render


def empty_room(window=None) -> Scene:
    return Scene(
        room_min=np.array([-3.0, 0.0, 0.0]),
        room_max=np.array([3.0, 3.0, 4.0]),
        boxes=[],
        spheres=[],
        colors=np.full((6, 3), 0.5),
        texture_scales=np.full(6, 0.5),
        light=np.array([0.0, 2.8, 2.0]),
        window=window,
    )


def test_same_seed_same_scene_other_seed_other_scene():
    a, b, c = generate_scene(7, 32, 48), generate_scene(7, 32, 48), generate_scene(8, 32, 48)
    for key in ("rgb", "depth", "normals", "mask"):
        assert np.array_equal(a[key], b[key])
    assert not np.array_equal(a["depth"], c["depth"])
    assert a["rgb"].dtype == np.uint8 and a["depth"].dtype == np.float32 and a["mask"].dtype == bool
    assert a["normals"].dtype == np.float32 and a["normals"].shape == (32, 48, 3)


def test_random_scenes_are_textured_with_invalid_regions():
    scenes = [generate_scene(seed, 48, 64) for seed in range(8)]
    assert any((~s["mask"]).any() for s in scenes)  # windows show sky
    for s in scenes:
        assert s["mask"].mean() > 0.5 and (s["depth"][s["mask"]] > 0).all()
        assert len(np.unique(s["rgb"].reshape(-1, 3), axis=0)) > 100  # shading and texture, not flat colours
        assert not s["normals"][~s["mask"]].any() and not s["depth"][~s["mask"]].any()


def test_fronto_parallel_wall_has_constant_planar_depth_and_faces_the_camera():
    camera = Camera(24, 32, focal=20.0, position=np.array([0.0, 1.5, 1.0]))  # looks along +z at the far wall
    out = render(empty_room(), camera)
    wall = out["mask"] & (np.abs(out["normals"][..., 2] - 1) < 1e-6)
    assert wall[8:16, 8:24].all()  # image centre sees the far wall
    np.testing.assert_allclose(out["depth"][wall], 3.0, atol=1e-5)  # planar, not distance to the camera
    np.testing.assert_allclose(out["normals"][wall], np.tile([0.0, 0.0, 1.0], (wall.sum(), 1)), atol=1e-6)


def test_floor_points_up_and_side_walls_face_inwards():
    camera = Camera(48, 64, focal=20.0, position=np.array([0.0, 1.5, 0.5]))
    out = render(empty_room(), camera)
    n = out["normals"]
    floor = n[-1, 32]  # bottom row, centre column sees the floor
    np.testing.assert_allclose(floor, [0.0, 1.0, 0.0], atol=1e-6)
    ceiling = n[0, 32]
    np.testing.assert_allclose(ceiling, [0.0, -1.0, 0.0], atol=1e-6)
    # The wall on the image's left (world x = -3) faces image-right: x points left, so n_x = -1.
    np.testing.assert_allclose(n[24, 0], [-1.0, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(n[24, -1], [1.0, 0.0, 0.0], atol=1e-6)
    # Floor depth grows towards the horizon (rows closer to the image centre are further away).
    assert out["depth"][-1, 32] < out["depth"][-8, 32]


def test_normals_rotate_with_the_camera():
    yawed = _look_rotation(np.deg2rad(30), 0.0)
    camera = Camera(24, 32, focal=20.0, rotation=yawed, position=np.array([0.0, 1.5, 1.0]))
    centre = render(empty_room(), camera)["normals"][12, 16]
    # The far wall normal (world -z) seen by a camera yawed 30 degrees to the right leans to the image right.
    np.testing.assert_allclose(centre, [-np.sin(np.deg2rad(30)), 0.0, np.cos(np.deg2rad(30))], atol=1e-6)


def test_window_is_invalid_everywhere_else_unit_normals():
    camera = Camera(24, 32, focal=20.0, position=np.array([0.0, 1.5, 1.0]))
    out = render(empty_room(window=(5, -0.5, 0.5, 1.2, 1.8)), camera)
    assert not out["mask"][12, 16] and out["depth"][12, 16] == 0 and not out["normals"][12, 16].any()
    lengths = np.linalg.norm(out["normals"][out["mask"]], axis=-1)
    np.testing.assert_allclose(lengths, 1.0, atol=1e-5)
    assert (out["depth"][out["mask"]] > 0).all()
