"""The engine, placement, dispatcher and (later) the controller, state store and gateway."""
