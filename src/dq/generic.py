"""`GenericActor`: class-based actors (Dramatiq's ``dramatiq.generic``)."""

from __future__ import annotations

from typing import Any

from dq.actor import Actor, actor

__all__ = ["GenericActor", "generic_actor"]


class generic_actor(type):
    """Metaclass that makes each concrete `GenericActor` subclass an actor instance."""

    def __new__(metacls, name: str, bases: tuple[type, ...], attrs: dict[str, Any]) -> Any:
        clazz = super().__new__(metacls, name, bases, attrs)
        meta = getattr(clazz, "Meta", object())
        if getattr(meta, "abstract", False):
            # Subclasses inherit the abstract base's Meta without `abstract`.
            options = {k: v for k, v in vars(meta).items() if not k.startswith("_")}
            options.pop("abstract")
            clazz.Meta = type("Meta", (), options)  # type: ignore[attr-defined]  # dynamic
            return clazz
        options = {k: v for k, v in vars(meta).items() if not k.startswith("_")}
        decorator = options.pop("actor", actor)
        instance = clazz()
        options.setdefault("actor_name", name)
        clazz.__actor__ = decorator(instance.perform, **options)  # type: ignore[attr-defined]  # set at run time
        return instance

    def __getattr__(cls, name: str) -> Any:
        if "__actor__" in cls.__dict__:
            return getattr(cls.__dict__["__actor__"], name)
        raise AttributeError(f"type object {cls.__name__!r} has no attribute {name!r}")


class GenericActor(metaclass=generic_actor):
    """Base class of class-based actors: subclass it and define ``perform``.

    The subclass name is bound to an *instance* whose attribute lookups fall through
    to the underlying `Actor` (``send``, ``send_with_options``, ``queue_name``, …);
    calling it calls ``perform``. An inner ``Meta`` class holds the ``actor(...)``
    keyword arguments; ``abstract = True`` keeps a base class abstract.
    """

    class Meta:
        abstract = True

    __actor__: Actor[Any, Any]

    def __getattr__(self, name: str) -> Any:
        actor_ = type(self).__dict__.get("__actor__")
        if actor_ is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(actor_, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.perform(*args, **kwargs)

    def perform(self, *args: Any, **kwargs: Any) -> Any:
        """The actor's body: subclasses define it."""
        raise NotImplementedError(f"{type(self).__name__} must define perform()")
