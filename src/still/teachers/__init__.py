"""Teachers: live models, recorded stores, mixtures, EMA and self-teachers, behind one interface."""

from still.teachers.base import LiveTeacher, Teacher, weights_fingerprint

__all__ = ["Teacher", "LiveTeacher", "weights_fingerprint"]
