"""Idempotent registration: re-importing or reloading randwire_d2 must not crash
detectron2's registries (which refuse a second object under the same name)."""


def register_once(registry):
    def decorator(obj):
        if obj.__name__ not in registry:
            registry.register(obj)
        return obj

    return decorator
