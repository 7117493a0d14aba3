"""The matching engine under the API: vector indexes and their follower, neighbour search, calibration and
entities. Imports nothing from ``service/``; returns plain types and raises ``matching.errors``."""
