"""JHMDB keypoint helpers (CRW protocol) and VIP mIoU on constructed cases with hand-worked answers."""
import math

import numpy as np
import pytest
import scipy.io

from cosettle.eval.frame.keypoints import decode_keypoints, joint_heatmaps, pck, read_jhmdb_joints
from cosettle.eval.frame.segmentation_metrics import VIP_CLASSES, confusion_matrix, miou

E2, E4, E8 = math.exp(-2), math.exp(-4), math.exp(-8)  # sigma 0.5: exp(-d^2 / 0.5)


def test_read_jhmdb_joints(tmp_path):
    pos = np.zeros((2, 15, 3))
    pos[0, 4, 2], pos[1, 4, 2] = 11.0, 21.0  # joint 4, frame 2, 1-based (x, y)
    scipy.io.savemat(tmp_path / "joint_positions.mat", {"pos_img": pos})
    joints = read_jhmdb_joints(tmp_path / "joint_positions.mat")
    assert joints.shape == (3, 15, 2)
    assert joints[2, 4].tolist() == [10.0, 20.0]
    assert joints[0, 0].tolist() == [-1.0, -1.0]
    scipy.io.savemat(tmp_path / "one.mat", {"pos_img": pos[:, :, 2]})  # stored as 2 x 15 by MATLAB
    assert read_jhmdb_joints(tmp_path / "one.mat").tolist() == joints[2:].tolist()


def test_read_jhmdb_joints_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="none.mat: file not found"):
        read_jhmdb_joints(tmp_path / "none.mat")
    scipy.io.savemat(tmp_path / "other.mat", {"pos_world": np.zeros((2, 15, 3))})
    with pytest.raises(ValueError, match="other.mat: no 'pos_img'"):
        read_jhmdb_joints(tmp_path / "other.mat")
    scipy.io.savemat(tmp_path / "shape.mat", {"pos_img": np.zeros((2, 13, 3))})
    with pytest.raises(ValueError, match=r"shape.mat: 'pos_img' has shape \(2, 13, 3\)"):
        read_jhmdb_joints(tmp_path / "shape.mat")
    (tmp_path / "junk.mat").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.mat: not a readable MATLAB file"):
        read_jhmdb_joints(tmp_path / "junk.mat")


def test_joint_heatmaps_follow_crw_placement():
    maps = joint_heatmaps(np.array([[5.3, 2.0], [5.7, 2.0], [-5.0, 1.0]]), (6, 8))
    assert maps.shape == (4, 6, 8)
    # joint 0 at x 5.3: CRW pastes its 4-cell patch at int(5.3 - 1.5) = 3, peak on cell 5
    np.testing.assert_allclose(maps[1, 2], [0, 0, 0, E8, E2, 1, E2, 0])
    np.testing.assert_allclose(maps[1, :, 5], [E8, E2, 1, E2, 0, 0])  # y 2.0: patch at int(0.5) = 0
    assert maps[1, 1, 4] == pytest.approx(E4)
    assert maps[2, 2].argmax() == 6  # x 5.7: patch at int(4.2) = 4, peak on cell 6
    assert not maps[3].any()  # a joint off the grid leaves its channel empty
    np.testing.assert_array_equal(maps[0], (maps[1:] == 0).all(0))


def test_joint_heatmaps_keep_crw_edge_truncation():
    # x 1.4: int(-0.1) truncates to 0, so the patch starts at cell 0 and the peak lands on cell 2
    maps = joint_heatmaps(np.array([[1.4, 3.0]]), (6, 6))
    np.testing.assert_allclose(maps[1, 3], [E8, E2, 1, 0, 0, 0])


def test_decode_keypoints():
    maps = np.zeros((4, 4, 5))  # background + 3 joints on a 4x5 grid
    maps[0] = 7.0  # the background channel is ignored
    maps[1, 1, 2], maps[1, 1, 3], maps[1, 2, 2] = 0.6, 0.3, 0.1
    maps[3, 0, 0], maps[3, 3, 4], maps[3, 0, 4], maps[3, 3, 0] = 4, 3, 2, 1
    coords = decode_keypoints(maps, orig_hw=(40, 100))
    # joint 1: x = 0.6*2 + 0.3*3 + 0.1*2 = 2.3 cells, y = 1.1 cells; cells are 20 x 10 pixels
    np.testing.assert_allclose(coords[0], [46.0, 11.0])
    assert np.isnan(coords[1]).all()  # all-zero map: invisible
    # joint 3: top 3 = 4 at (0,0), 3 at (3,4), 2 at (0,4): x = 20/9 cells, y = 9/9 cells
    np.testing.assert_allclose(coords[2], [400 / 9, 10.0])
    np.testing.assert_allclose(decode_keypoints(maps[1:], (40, 100), background=False), coords)


def frames(*joints):
    return np.array(joints, dtype=np.float64)


def test_pck_per_joint_then_mean_and_frame_zero_ignored():
    gt = frames([[0, 0], [50, 50]],  # frame 0: never scored
                [[0, 0], [3, 4]],  # box 0.6 * 5 = 3
                [[10, 10], [16, 18]])  # box 0.6 * 10 = 6
    pred = frames([[99, 99], [-99, 0]],
                  [[0.25, 0], [3, 4.5]],  # errors 0.083, 0.167
                  [[10.9, 10], [17.5, 18]])  # errors 0.15, 0.25
    # joint 0: 1/2 at 0.1, 2/2 at 0.2; joint 1: 0/2 at 0.1, 1/2 at 0.2
    assert pck(pred, gt) == pytest.approx({"PCK@0.1": 0.25, "PCK@0.2": 0.75})


def test_pck_invisible_joints_leave_the_box_and_the_score():
    gt = frames([[0, 0], [0, 0], [0, 0]], [[0, 0], [3, 4], [30, 40]])
    pred = frames([[0, 0], [0, 0], [0, 0]], [[0.4, 0], [3.4, 4], [np.nan, np.nan]])
    # box from joints 0 and 1 only: 3, errors 0.4 / 3 = 0.133 (with joint 2 it would be 30)
    assert pck(pred, gt) == pytest.approx({"PCK@0.1": 0.0, "PCK@0.2": 1.0})


def test_pck_pools_frames_of_all_videos():
    def video(frames_wrong):
        gt = np.tile([[0.0, 0.0], [3.0, 4.0]], (1 + len(frames_wrong), 1, 1))
        pred = gt.copy()
        pred[1:, 0, 0] += np.where(frames_wrong, 2.0, 0.0)  # 2 / 3 > 0.2 when wrong
        return pred, gt

    (p1, g1), (p2, g2) = video([False]), video([True, True, True])
    # joint 0: 1 right of 4 pooled frames; joint 1 always right (per-video averaging would give 0.75)
    assert pck([p1, p2], [g1, g2], alphas=(0.2,)) == pytest.approx({"PCK@0.2": (0.25 + 1.0) / 2})


def test_pck_zero_box_counts_as_wrong():
    gt = frames([[0, 0], [0, 0]], [[5, 5], [5, 5]])
    assert pck(gt.copy(), gt, alphas=(0.5,)) == {"PCK@0.5": 0.0}


def test_vip_classes():
    assert len(VIP_CLASSES) == 20 and VIP_CLASSES[0] == "background" and VIP_CLASSES[-1] == "left-shoe"


def test_confusion_matrix_and_miou():
    gt = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [1, 2, 0]])
    conf = confusion_matrix(gt, pred, num_classes=4)
    expected = np.zeros((4, 4), int)
    expected[0, 0], expected[0, 1], expected[1, 1], expected[2, 2] = 1, 1, 2, 1  # 255 ignored
    np.testing.assert_array_equal(conf, expected)
    per_class, mean = miou(conf)
    np.testing.assert_allclose(per_class[:3], [1 / 2, 2 / 3, 1.0])
    assert np.isnan(per_class[3])  # absent from both: left out of the mean
    assert mean == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)


def test_confusion_matrix_rejects_predictions_out_of_range():
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(np.array([0, 1]), np.array([0, 20]))
