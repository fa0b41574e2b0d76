"""Why a replica refuses or fails a request: the exceptions the serving layer catches (a light
module: no torch, so the HTTP ingress can import it)."""


class RequestRejected(ValueError):
    """A request that can never be served (an empty prompt, an id outside the vocabulary, or too
    long for the context limit or the whole cache); raised before anything is queued. ``param``
    names the request field at fault, ``code`` is OpenAI's error code where one applies."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code

    def __reduce__(self) -> tuple[object, ...]:  # crosses process boundaries (Ray) whole
        return (type(self), (str(self), self.param, self.code))


class ReplicaBroken(RuntimeError):
    """The replica lost a rank (or its state diverged) and takes no more requests."""
