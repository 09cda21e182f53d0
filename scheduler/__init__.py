"""scheduler: the Ray side — batch specs, the queue, the actors and the CLI."""

__all__: list[str] = []
