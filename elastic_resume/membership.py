"""Who this process is in the job, now: the one owner of membership.

Rank, world size and the process groups elastic-resume runs its own collectives on (checkpoint
coordination, the spike vote, the preemption flag) live here and nowhere else. Consumers keep a
handle (a :class:`~elastic_resume.collectives.TorchGroup`, or a group's name) and read rank and
world size through it on every call, so a re-formed job is one call, :meth:`Membership.reconfigure`,
not a stale copy in every object that ever asked.

- **Generation.** Each re-formation of the default process group is a new generation. Whoever
  re-forms it (in-process recovery, or a test) calls :meth:`reconfigure` on every member of the new
  world, in the same order as any other collective: every group this process created is then
  created again over the new world, in the order they were first made (creating a group is
  collective, and a different order on two ranks would pair the wrong groups).
- **Abort.** :meth:`abort` tears down every group, ours and the default one, so that nothing is
  left blocked on a peer that died. Under gloo that is ``destroy_process_group``; under NCCL,
  torch's communicator abort where the installed torch offers it (the same seam; not exercised
  without a GPU).

Groups are created lazily, by the first consumer that needs one, on the training thread, in the
order every rank constructs its objects (a manager, then the guard's vote): the same on every rank.
"""

from __future__ import annotations

import atexit
import threading
import weakref
from collections.abc import Callable
from typing import Any

from ._torch_compat import abort_process_group
from .collectives import Group, LocalGroup, TorchGroup


class Membership:
    """The process's place in the job; :func:`current` returns the one instance."""

    def __init__(self) -> None:
        self.generation = 0
        # Handles of the coordination groups made so far, one per consumer.
        self._coordination: list[TorchGroup] = []
        # Other gloo groups by name (the vote, the preemption flag): torch groups, made on request.
        self._named: dict[str, Any] = {}
        # Creation order of every group above, replayed by reconfigure().
        self._order: list[tuple[str, Any]] = []
        self._followers: list[weakref.WeakMethod[Callable[[], None]]] = []
        self._lock = threading.Lock()
        # Let go of the groups while the interpreter is whole: a gloo group destroyed during
        # interpreter teardown can abort the process (std::terminate), which torchrun reports as
        # a crash. atexit runs last-registered first, so the writers' own exit hooks (a
        # background save finishing) registered later still have their groups.
        atexit.register(self._release)

    def _release(self) -> None:
        with self._lock:
            self._coordination, self._named, self._order = [], {}, []

    # -- who we are --------------------------------------------------------------------------
    @staticmethod
    def _dist() -> Any:
        import torch.distributed as dist

        return dist if dist.is_available() and dist.is_initialized() else None

    @property
    def distributed(self) -> bool:
        """A default process group with more than one rank is initialised."""
        dist = self._dist()
        return dist is not None and dist.get_world_size() > 1

    @property
    def rank(self) -> int:
        dist = self._dist()
        return dist.get_rank() if dist is not None else 0

    @property
    def world_size(self) -> int:
        dist = self._dist()
        return dist.get_world_size() if dist is not None else 1

    @property
    def backend(self) -> str | None:
        dist = self._dist()
        return str(dist.get_backend()) if dist is not None else None

    # -- the groups --------------------------------------------------------------------------
    def coordination_group(self, timeout_s: float = 600.0) -> Group:
        """Where one consumer (a manager, a Lightning plugin) agrees: a gloo group of its own over
        every rank, with its own timeout, so two consumers' collectives (one of them in a save
        thread) never interleave; a world of one when the job is not distributed. Collective."""
        if not self.distributed:
            return LocalGroup()
        with self._lock:
            handle = TorchGroup(timeout_s)
            self._order.append(("coordination", len(self._coordination)))
            self._coordination.append(handle)
            return handle

    def named_group(self, name: str) -> Any:
        """A gloo group of its own over every rank for one consumer (``vote``, ``preemption``):
        its collectives never interleave with another consumer's. None when not distributed."""
        if not self.distributed:
            return None
        with self._lock:
            group = self._named.get(name)
            if group is None:
                group = self._named[name] = self._dist().new_group(backend="gloo")
                self._order.append(("named", name))
            return group

    def follow(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` (a bound method; held weakly) after each :meth:`reconfigure`: for a
        value that must follow the rank (an event log's ``rank``)."""
        self._followers.append(weakref.WeakMethod(callback))

    # -- re-forming --------------------------------------------------------------------------
    def reconfigure(self) -> None:
        """Collective over the new world, after the default process group was initialised again:
        a new generation. Every group made before is made again over the new world, in the same
        order; handles consumers hold now point at the new groups."""
        dist = self._dist()
        with self._lock:
            self.generation += 1
            order = list(self._order)
            for kind, key in order:
                if dist is None:
                    break
                if kind == "coordination":
                    self._coordination[key].rebuild()
                else:
                    self._named[key] = dist.new_group(backend="gloo")
        alive = []
        for ref in self._followers:
            method = ref()
            if method is not None:
                method()
                alive.append(ref)
        self._followers = alive

    def abort(self) -> None:
        """Tear down every group (ours, then the default one) so that nothing waits on a dead
        peer; the next :meth:`reconfigure` builds them again."""
        dist = self._dist()
        if dist is None:
            return
        with self._lock:
            groups = [h.group for h in self._coordination] + list(self._named.values())
        for group in groups:
            _abort_group(dist, group)
        _abort_group(dist, None)


def _abort_group(dist: Any, group: Any) -> None:
    """Abort one group: NCCL communicators through torch's abort where it exists (in-flight
    kernels would otherwise never return); anything else, and what remains, destroyed."""
    try:
        backend = dist.get_backend(group)
    except (RuntimeError, ValueError):
        return  # already gone
    if backend == "nccl" and abort_process_group(group):
        return
    dist.destroy_process_group(group)


_current = Membership()


def current() -> Membership:
    """This process's membership."""
    return _current
