"""A hand-written placement of redundant experts for the tests (not the project's planner):
each extra slot to the expert with the most load per copy, then the slots, heaviest first, onto
the device with the least load that still has room."""

import numpy as np

from frontier_jax.parallel.placement import Placement


def replicate_hot(load: np.ndarray, *, replicas: int, devices: int) -> Placement:
    """load [L, E] -> a Placement of E + replicas slots per layer, (E + replicas) / devices each."""
    layers, experts = load.shape
    per_device = (experts + replicas) // devices
    physical = []
    for row in np.asarray(load, float):
        copies = np.ones(experts, int)
        for _ in range(replicas):
            copies[np.argmax(row / copies)] += 1
        slots = sorted(
            ((row[e] / copies[e], e) for e in range(experts) for _ in range(copies[e])), reverse=True
        )
        held, weight = [[] for _ in range(devices)], np.zeros(devices)
        for share, e in slots:
            device = min((d for d in range(devices) if len(held[d]) < per_device), key=lambda d: weight[d])
            held[device].append(e)
            weight[device] += share
        physical.append([e for device in held for e in device])
    return Placement.from_physical(np.asarray(physical), experts)
