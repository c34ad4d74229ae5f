"""Who speaks which track: each person's mouth motion against each audio stream's speech gives a persons x
streams matrix of offline sync confidences; the assignment of streams to persons maximises their sum (Hungarian
method), and the binding accuracy is the share of persons given the stream meant for them (stream i for person i,
persons numbered left to right, as a generation job pairs them)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from evaluation.lipsync import sync_score


@dataclass(frozen=True)
class Binding:
    matrix: np.ndarray  # [P, S] sync confidence of person p's mouth with stream s
    assignment: list[int]  # the stream bound to each person, left to right (-1: none, more persons than streams)

    @property
    def accuracy(self) -> float:
        """Share of persons bound to their own stream (person i to stream i)."""
        return float(np.mean([stream == person for person, stream in enumerate(self.assignment)]))


def binding_matrix(mouth: np.ndarray, speech: np.ndarray, max_offset: int = 3) -> np.ndarray:
    """[P, S] offline sync confidences of mouth signals [P, 2, T] (`evaluation.landmarks.mouth_signals`) with
    speech signals [S, 3, T] (`evaluation.lipsync.speech_signal`)."""
    return np.array([[sync_score(m, s, max_offset).confidence for s in speech] for m in mouth])


def bind(matrix: np.ndarray) -> Binding:
    """The stream per person that maximises the summed confidence, each stream used once."""
    persons, streams = linear_sum_assignment(matrix, maximize=True)
    assignment = [-1] * matrix.shape[0]
    for person, stream in zip(persons, streams, strict=True):
        assignment[person] = int(stream)
    return Binding(matrix=matrix, assignment=assignment)
