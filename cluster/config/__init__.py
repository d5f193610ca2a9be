"""The configuration tree: ServeConfig -> ControllerConfig -> EngineConfig (pydantic, frozen)."""
