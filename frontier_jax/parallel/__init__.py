"""How the model is laid out over a device mesh: logical-axis rules and constraints."""
