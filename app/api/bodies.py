"""A request body as Backstop's guards read it: counted against the limit as it arrives, and
what is left of it read and dropped before a refusal (see `Body.discard`)."""

from __future__ import annotations

from starlette.types import Message, Receive


class BodyTooLarge(Exception):
    """A request body passed the limit while it was read."""


class Body:
    """A request's body as the route reads it: counted as it arrives (a chunked body has no
    length up front), refused once past `limit`, and what is left of it can be dropped."""

    def __init__(self, receive: Receive, limit: int, declared: str | None) -> None:
        self._receive = receive
        self.limit = limit
        # What Content-Length says, when it says a number.
        self.declared = int(declared) if declared is not None and declared.isdigit() else None
        self.seen = 0
        self.ended = False

    async def receive(self) -> Message:
        """The next message, as the ASGI `receive` gives it; `BodyTooLarge` past the limit."""
        message = await self._receive()
        if message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            self.ended = not message.get("more_body", False)
            if self.seen > self.limit:
                raise BodyTooLarge
        else:
            self.ended = True
        return message

    async def discard(self, bound: int) -> bool:
        """Read what is left of the body and drop it, up to `bound` bytes in all; whether
        the body ended within the bound (False: the client went or sends more)."""
        if self.declared is not None and self.declared > bound:
            return False
        while not self.ended:
            message = await self._receive()
            if message["type"] != "http.request":
                return False
            self.seen += len(message.get("body", b""))
            self.ended = not message.get("more_body", False)
            if self.seen > bound:
                return False
        return self.seen <= bound
