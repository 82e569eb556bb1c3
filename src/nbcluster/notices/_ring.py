"""The gateway's recent notices, bounded, and the live subscribers to new ones.

Pure bookkeeping on the gateway's event loop (no I/O): the notifier publishes into it; the
events API pages through it and the server-sent-events endpoint subscribes to it. A
subscriber that does not keep up is dropped rather than buffered without bound: its stream
ends with the ``seq`` it had reached, and the client pages from there (nothing is lost while
the ring still holds it)."""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable

from ._notice import ClusterNotice, NoticePage, NoticeQuery

__all__ = ["NoticeRing", "NoticeSubscription", "SubscriberDropped"]

#: Whether a caller may see a notice (admins: all; users: their own).
Visible = Callable[[ClusterNotice], bool]


class SubscriberDropped(Exception):
    """The subscriber fell more than its limit behind; ``last_seq`` is the last notice it was
    given (page from there with ``since``)."""

    def __init__(self, last_seq: int, limit: int) -> None:
        super().__init__(
            f"dropped: more than {limit} notices were waiting for this subscriber; "
            f"continue with since={last_seq}"
        )
        self.last_seq = last_seq


class NoticeSubscription:
    """One live reader (an event-stream connection). Made by :meth:`NoticeRing.subscribe`;
    closed with :meth:`NoticeRing.unsubscribe`."""

    def __init__(self, visible: Visible, limit: int, last_seq: int) -> None:
        self._visible = visible
        self._limit = limit
        self._queue: deque[ClusterNotice] = deque()
        self._ready = asyncio.Event()
        self.dropped = False
        #: The last notice handed out (or the ring's head when it subscribed).
        self.last_seq = last_seq

    def offer(self, notice: ClusterNotice) -> bool:
        """Queue a notice it may see; False when that put it over its limit (it is dropped)."""
        if self.dropped or not self._visible(notice):
            return not self.dropped
        if len(self._queue) >= self._limit:
            self.dropped = True
            self._queue.clear()  # what it held is freed: it pages from ``last_seq`` instead
            self._ready.set()
            return False
        self._queue.append(notice)
        self._ready.set()
        return True

    def pending(self) -> int:
        return len(self._queue)

    async def next(self, timeout: float | None = None) -> ClusterNotice | None:
        """The next notice, or None after ``timeout`` seconds without one (the caller sends a
        keep-alive). Raises :class:`SubscriberDropped` once it was dropped."""
        while not self._queue:
            if self.dropped:
                raise SubscriberDropped(self.last_seq, self._limit)
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except TimeoutError:
                return None
        if self.dropped:
            raise SubscriberDropped(self.last_seq, self._limit)
        notice = self._queue.popleft()
        self.last_seq = notice.seq
        return notice


class NoticeRing:
    """Built by the gateway's notifier. ``capacity`` notices are kept; older ones fall out."""

    def __init__(self, capacity: int = 10_000) -> None:
        if capacity < 1:
            raise ValueError(f"capacity: must be at least 1, got {capacity}")
        self.capacity = capacity
        self._notices: deque[ClusterNotice] = deque(maxlen=capacity)
        self._subscribers: list[NoticeSubscription] = []
        self._last_seq = 0

    @property
    def last_seq(self) -> int:
        return self._last_seq

    @property
    def oldest_seq(self) -> int:
        return self._notices[0].seq if self._notices else self._last_seq + 1

    def __len__(self) -> int:
        return len(self._notices)

    def publish(self, draft: ClusterNotice) -> ClusterNotice:
        """Number ``draft`` (its ``seq`` is ignored), keep it, hand it to every subscriber
        that may see it; subscribers over their limit are dropped. Returns the notice kept."""
        self._last_seq += 1
        notice = draft.model_copy(update={"seq": self._last_seq})
        self._notices.append(notice)
        self._subscribers = [s for s in self._subscribers if s.offer(notice)]
        return notice

    def restore(self, notices: list[ClusterNotice]) -> None:
        """Take notices an earlier gateway wrote (from the Redis stream), oldest first, before
        any is published: numbering continues after them."""
        if self._notices:
            raise RuntimeError("restore() must come before the first publish()")
        for notice in notices[-self.capacity :]:
            self._notices.append(notice)
        if self._notices:
            self._last_seq = self._notices[-1].seq

    def page(self, query: NoticeQuery, visible: Visible) -> NoticePage:
        """Notices after ``query.since`` that match and that the caller may see, oldest
        first, at most ``query.limit``."""
        if query.since > self._last_seq:
            # A cursor from an earlier gateway that kept no history: start again.
            query = query.model_copy(update={"since": 0})
        start = max(0, query.since + 1 - self.oldest_seq)
        found: list[ClusterNotice] = []
        cursor = query.since
        more = False
        for notice in itertools.islice(self._notices, start, None):
            if query.matches(notice) and visible(notice):
                if len(found) == query.limit:
                    more = True
                    break
                found.append(notice)
            cursor = notice.seq
        return NoticePage(notices=found, next=cursor, more=more, oldest=self.oldest_seq)

    def subscribe(self, visible: Visible, limit: int = 1000) -> NoticeSubscription:
        """A live reader of notices published from now on."""
        subscription = NoticeSubscription(visible, limit, self._last_seq)
        self._subscribers.append(subscription)
        return subscription

    def unsubscribe(self, subscription: NoticeSubscription) -> None:
        if subscription in self._subscribers:
            self._subscribers.remove(subscription)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)
