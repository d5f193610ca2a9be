"""The parts a replica, a gateway and the controller are made of, as plain classes; the Ray
shells over them live in actors/. Sub-packages: engine, experts, placement, control, gateway,
config."""
