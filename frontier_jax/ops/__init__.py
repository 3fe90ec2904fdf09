"""Operators below the model and the mesh: routing tuples, grouped matrix multiply, and the
local computation of routed experts (`dispatch.LocalExperts`).  `parallel.expert` builds the
expert-parallel dispatcher from these pieces; the model is given one of the two."""
