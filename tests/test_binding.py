"""Binding of audio streams to persons: the assignment maximises the summed sync confidence, one stream per person,
and the accuracy counts the persons given their own stream (stream i for person i, persons left to right)."""

from __future__ import annotations

import numpy as np

from evaluation.binding import bind, binding_matrix
from evaluation.lipsync import SAMPLES_PER_FRAME, speech_signal


def test_assignment_takes_the_best_total_not_each_persons_best():
    # Person 0 follows both streams best with stream 0, but giving it stream 1 frees stream 0 for person 1.
    matrix = np.array([[0.9, 0.8], [0.85, 0.1]])

    binding = bind(matrix)

    assert binding.assignment == [1, 0] and binding.accuracy == 0.0


def test_more_persons_than_streams_leave_a_person_unbound():
    binding = bind(np.array([[0.2], [0.7], [0.1]]))

    assert binding.assignment == [-1, 0, -1] and binding.accuracy == 0.0


def test_each_mouth_binds_to_the_stream_it_moves_with():
    rng = np.random.default_rng(0)
    turns = np.repeat(np.arange(6) % 2, 25)  # person 0 speaks in even seconds, person 1 in odd ones
    waves = [rng.normal(size=150 * SAMPLES_PER_FRAME) * np.repeat(turns == p, SAMPLES_PER_FRAME) for p in range(2)]
    speech = np.stack([speech_signal(wave, 150) for wave in waves])
    # Lip speed and opening (interocular distances): fast and open while the person speaks, landmark jitter and a
    # closed mouth otherwise.
    speaking = turns == np.arange(2)[:, None]
    speeds = np.where(speaking, 0.03, 0.003) * np.exp(0.3 * rng.normal(size=(2, 150)))
    openings = np.where(speaking, 0.15, 0.05) * np.exp(0.1 * rng.normal(size=(2, 150)))
    mouths = np.stack([speeds, openings], axis=1)

    in_order = bind(binding_matrix(mouths, speech))
    swapped = bind(binding_matrix(mouths, speech[::-1]))

    assert in_order.assignment == [0, 1] and in_order.accuracy == 1.0
    assert swapped.assignment == [1, 0] and swapped.accuracy == 0.0
    assert np.all(np.diag(in_order.matrix) > 0.3) and np.all(np.diag(in_order.matrix[:, ::-1]) < 0)
