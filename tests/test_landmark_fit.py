"""dlib's landmarks on small faces: fitted on the face crop scaled to a fixed box width, the points are sub-pixel, so
a face a quarter the size gives the same lip points (the mouth signal of the offline lip-sync score)."""

from __future__ import annotations

import cv2
import numpy as np

from evaluation.landmarks import MOUTH, detect_faces, landmarks_68
from multitalk_model.media import read_video_frames


def test_lip_points_of_a_face_shrunk_four_times_match_the_full_size_fit(shared_media):
    frame = read_video_frames(shared_media / "talking_man_25fps.mp4", num_frames=1)[0]  # 844 px, eyes 183 px apart
    box = detect_faces(frame)[0]
    full = landmarks_68(frame[None], box[None, None])[0, 0]
    small = cv2.resize(frame, None, fx=0.25, fy=0.25, interpolation=cv2.INTER_AREA)  # eyes 46 px apart
    shrunk = landmarks_68(small[None], ((box + 0.5) / 4 - 0.5)[None, None])[0, 0]

    eye_distance = np.linalg.norm(full[36] - full[45])
    error = np.linalg.norm((shrunk + 0.5) * 4 - 0.5 - full, axis=-1)[MOUTH].mean() / eye_distance
    # Whole-pixel points on the small face (dlib on the frame as it is) are 1.0% of the eye distance off; the
    # sub-pixel fit 0.3%.
    assert error < 0.006
    assert np.any(shrunk != np.round(shrunk))
