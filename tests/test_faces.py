"""Face detectors on the real shared media: MTCNN (weights from the facenet-pytorch wheel), Haar, insightface errors."""

import re

import av
import numpy as np
import pytest
from PIL import Image

from multitalk_model.faces import Face, HaarDetector, InsightFaceDetector, MTCNNDetector, build_face_detector


@pytest.fixture(scope="module")
def mtcnn() -> MTCNNDetector:
    return MTCNNDetector()


def _rgb(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_mtcnn_finds_the_man_on_the_left_and_the_woman_on_the_right(mtcnn, shared_media):
    image = _rgb(shared_media / "two_people_car.png")
    width = image.shape[1]

    faces = mtcnn.detect(image)

    assert len(faces) == 2
    man, woman = sorted(faces, key=lambda face: face.center[0])
    assert man.center[0] < width / 2 < woman.center[0]
    assert all(face.score >= 0.9 for face in faces)
    assert faces[0].area >= faces[1].area  # largest first
    # Face-sized boxes: the man's face is about 380 px wide in this 2560x1440 photo.
    assert 250 < man.width < 500 and 200 < woman.width < 400


def test_mtcnn_finds_exactly_one_face_in_the_rgba_studio_photo(mtcnn, shared_media):
    image = _rgb(shared_media / "one_person_studio.png")  # RGBA on disk

    faces = mtcnn.detect(image)

    assert len(faces) == 1
    x0, y0, x1, y1 = faces[0].box
    assert 0 <= x0 < x1 <= image.shape[1] and 0 <= y0 < y1 <= image.shape[0]


def test_mtcnn_finds_nothing_in_a_flat_grey_image(mtcnn):
    assert mtcnn.detect(np.full((360, 640, 3), 128, dtype=np.uint8)) == []


def test_detectors_reject_an_image_that_is_not_rgb_uint8(mtcnn):
    with pytest.raises(ValueError, match="image: expected an HxWx3 uint8 RGB array"):
        mtcnn.detect(np.zeros((64, 64, 4), dtype=np.uint8))


def test_missing_mtcnn_weights_name_the_folder_and_the_install_command(tmp_path, monkeypatch):
    # A facenet_pytorch package without its data folder, found first on the path.
    (tmp_path / "facenet_pytorch").mkdir()
    (tmp_path / "facenet_pytorch" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))

    with pytest.raises(FileNotFoundError) as error:
        MTCNNDetector()

    message = str(error.value)
    assert str(tmp_path / "facenet_pytorch" / "data") in message
    assert "pnet.pt" in message and "pip install --no-deps facenet-pytorch" in message


def test_haar_finds_a_face_in_a_talking_video_frame(shared_media):
    with av.open(str(shared_media / "talking_man_25fps.mp4")) as container:
        frame = next(container.decode(video=0)).to_ndarray(format="rgb24")

    faces = HaarDetector().detect(frame)

    assert len(faces) >= 1
    assert all(isinstance(face, Face) and face.width > 30 for face in faces)


@pytest.mark.parametrize("make_pack", [lambda root: root / "missing_pack", lambda root: root])
def test_insightface_pack_without_a_detector_names_the_directory(tmp_path, make_pack):
    pack = make_pack(tmp_path)  # a directory that does not exist, or one without any .onnx file

    with pytest.raises(FileNotFoundError, match=re.escape(f"insightface pack {pack}: no detector model")):
        InsightFaceDetector(str(pack))


def test_build_face_detector_picks_insightface_only_when_a_pack_is_given(tmp_path):
    assert isinstance(build_face_detector(), MTCNNDetector)
    assert isinstance(build_face_detector("haar"), HaarDetector)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        build_face_detector("auto", insightface_pack=str(tmp_path))
    with pytest.raises(ValueError, match="insightface_pack: required"):
        build_face_detector("insightface")


def test_face_geometry():
    face = Face(box=(10.0, 20.0, 50.0, 100.0), score=0.99)

    assert (face.width, face.height, face.area, face.center) == (40.0, 80.0, 3200.0, (30.0, 60.0))
