"""Soak: a million contexts, 1 % leaked, a small ledger cap: memory and tracking stay flat.

Run: ``python benchmarks/soak.py [--contexts 1000000] [--cap 1000] [--json]``
(about 20 s here for 10^6). Exit status 1 when a check fails.

Every context is an app context of one app, pushed and popped on the main
thread, except one in ``--leak-every`` that is pushed and never popped:

- most leaks happen inside a throwaway ``contextvars.Context``, as a short-lived
  task would: the task keeps its Context for the next ``--task-life`` leaks, then
  lets go, and the context becomes garbage (in a reference cycle: its token
  holds the Context that holds it) once the cycle collector runs. Half of them
  happen inside a unit of work (a request would be one: reported at the unit's
  end), half outside any unit (reported when the watchdog finds the object
  collected);
- the first ``--thread-leaks`` happen in a unit on one of four threads that stay
  alive to the end: those contexts stay reachable and keep their ledger slots.

With more leaked contexts alive at once than the cap, the ledger fills up, and
pushes are turned away and counted (``ledger.dropped_contexts``, exported as
``ctxtrace_dropped_total``) until a sweep or a reused id frees a slot.
``agent.sweep()`` runs every ``--sweep-every`` contexts, as the watchdog would
every second at a few hundred thousand contexts a second, after a full
collection (a server's collector frees old garbage more often than this loop's).

Checked: the ledger never tracks more than the cap, and reaches it; resident
memory (from /proc/self/statm) and the number of objects the garbage collector
tracks grow by less than a small bound after the warm-up (until the tasks hold
their full number of Contexts, and at least two sweeps); tracked pushes plus
dropped pushes equal the pushes made; tracked pops equal tracked pushes less
tracked leaks; each tracked leak in a unit is reported once.
"""

from __future__ import annotations

import argparse
import collections
import contextvars
import gc
import json
import os
import queue
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

PAGE = os.sysconf("SC_PAGE_SIZE")
#: Growth allowed after the warm-up; the run itself allocates nothing that lasts.
RSS_BOUND_BYTES = 4 * 1024 * 1024
OBJECTS_BOUND = 5_000
LIVE_THREADS = 4


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


@dataclass
class Sample:
    contexts: int
    rss: int
    tracked: int
    objects: int | None


@dataclass
class SoakResult:
    contexts: int
    cap: int
    warmup: int
    seconds: float
    pushes_made: int
    leaks: dict[str, int]
    tracked_leaks: dict[str, int]
    pushes_tracked: int
    pops_tracked: int
    dropped: int
    reported: dict[str, int]
    internal_errors: dict[str, int]
    peak_tracked: int
    warmup_rss: int
    peak_rss_after_warmup: int
    warmup_objects: int
    peak_objects_after_warmup: int
    samples: list[Sample] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


class _Counting:
    """An emitter that only counts (keeping events would be the leak)."""

    name = "soak"

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def handle(self, event: Any) -> None:
        key = f"{getattr(event, 'name', type(event).__name__)}:{getattr(event, 'reason', '')}"
        with self._lock:
            self.counts[key] += 1


class _LiveThread:
    """A thread that runs jobs until told to stop, keeping what they leak reachable."""

    def __init__(self, index: int) -> None:
        self.jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name=f"soak-live-{index}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            job()
            self.jobs.task_done()

    def run(self, job: Callable[[], None]) -> None:
        self.jobs.put(job)
        self.jobs.join()

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(10)


class _Driver:
    """Makes the contexts: clean ones, and leaks of each kind, in a fixed pattern."""

    def __init__(
        self, agent: Any, leak_every: int, thread_leaks: int, task_life: int
    ) -> None:
        from flask import Flask

        self.agent = agent
        self.app = Flask("soak")
        self.leak_every = leak_every
        self.thread_leaks = thread_leaks
        self.made_thread_leaks = 0
        self.leaks: Counter[str] = Counter()
        self.tracked_leaks: Counter[str] = Counter()
        self.live = [_LiveThread(i) for i in range(LIVE_THREADS)]
        # The tasks alive at the moment: each holds the Context it leaked in.
        self.life = task_life
        self.tasks: collections.deque[contextvars.Context] = collections.deque(
            maxlen=max(task_life, 1)
        )

    def leak(self, where: str, unit: bool) -> None:
        handle = self.agent.begin_unit("job", where) if unit else None
        ctx = self.app.app_context()
        ctx.push()
        self.leaks[where] += 1
        if self.agent.ledger.context_id(ctx) is not None:
            self.tracked_leaks[where] += 1
        if handle is not None:
            self.agent.end_unit(handle)

    def step(self, i: int) -> None:
        """The ``i``-th context."""
        if i % self.leak_every:
            with self.app.app_context():
                pass
        elif self.made_thread_leaks < self.thread_leaks:
            thread = self.live[self.made_thread_leaks % LIVE_THREADS]
            thread.run(lambda: self.leak("live_thread", True))
            self.made_thread_leaks += 1
        else:
            in_unit = (i // self.leak_every) % 2 == 0
            task = contextvars.Context()
            task.run(self.leak, "garbage_in_unit" if in_unit else "garbage_no_unit", in_unit)
            if self.life:
                self.tasks.append(task)

    def finish(self) -> None:
        """The tasks let go, the threads end."""
        self.tasks.clear()
        for thread in self.live:
            thread.stop()


def soak(
    contexts: int = 1_000_000,
    cap: int = 1000,
    leak_every: int = 100,
    thread_leaks: int = 100,
    task_life: int | None = None,
    sweep_every: int = 100_000,
    sample_every: int = 10_000,
) -> SoakResult:
    import ctxtrace
    from ctxtrace import _agent

    assert ctxtrace.instrument(
        ledger_cap=cap, metrics="none", spans="off", sweep_interval=86_400, log_rate_window=60
    ), "ctxtrace did not turn on"
    agent = _agent.current()
    assert agent is not None
    counting = _Counting()
    agent.subscribe(counting)
    life = 2 * cap if task_life is None else task_life
    driver = _Driver(agent, leak_every, thread_leaks, life)
    # Until the tasks hold their full number of Contexts, and a sweep after that.
    warmup = max(2 * sweep_every, (life + thread_leaks) * leak_every + sweep_every)
    samples: list[Sample] = []
    started = time.perf_counter()
    for i in range(contexts):
        driver.step(i)
        if (i + 1) % sweep_every == 0:
            # The contexts of tasks that let go are old enough to sit in the collector's
            # oldest generation, which a tight loop seldom collects; a server's full
            # collections would have freed them by the time of a sweep.
            gc.collect()
            agent.sweep()
        if (i + 1) % sample_every == 0:
            # Counting the collector's objects costs a few ms: only at the end of the
            # warm-up and every tenth sample.
            count_objects = (i + 1) % (sample_every * 10) == 0 or i + 1 == warmup
            # Less the samples themselves, the one thing this loop keeps on purpose.
            objects = len(gc.get_objects()) - len(samples) if count_objects else None
            samples.append(Sample(i + 1, rss_bytes(), agent.ledger.live_count(), objects))
    seconds = time.perf_counter() - started
    driver.finish()
    # A last sweep finds what the tasks and threads left.
    gc.collect()
    agent.sweep()
    result = _result(agent, driver, counting, samples, contexts, cap, seconds, warmup)
    ctxtrace.uninstrument()
    result.failures = check(result)
    return result


def _result(
    agent: Any,
    driver: _Driver,
    counting: _Counting,
    samples: list[Sample],
    contexts: int,
    cap: int,
    seconds: float,
    warmup: int,
) -> SoakResult:
    snapshot = agent.ledger.snapshot()
    after = [s for s in samples if s.contexts >= warmup] or samples[-1:]
    counted = [s.objects for s in after if s.objects] or [0]
    return SoakResult(
        contexts=contexts,
        cap=cap,
        warmup=warmup,
        seconds=round(seconds, 2),
        pushes_made=contexts,
        leaks=dict(driver.leaks),
        tracked_leaks=dict(driver.tracked_leaks),
        pushes_tracked=sum(s.pushes for s in snapshot),
        pops_tracked=sum(s.pops for s in snapshot),
        dropped=agent.dropped()["context"],
        reported=dict(counting.counts),
        internal_errors=agent.errors.counts(),
        peak_tracked=max(s.tracked for s in samples),
        warmup_rss=after[0].rss,
        peak_rss_after_warmup=max(s.rss for s in after),
        warmup_objects=counted[0],
        peak_objects_after_warmup=max(counted),
        samples=samples,
    )


def check(r: SoakResult) -> list[str]:
    failures = []

    def expect(ok: bool, what: str) -> None:
        if not ok:
            failures.append(what)

    expect(r.contexts > r.warmup, f"{r.contexts} contexts is no more than the warm-up")
    expect(r.peak_tracked <= r.cap, f"tracked {r.peak_tracked} contexts, cap {r.cap}")
    expect(r.peak_tracked == r.cap and r.dropped > 0, "the cap was never reached")
    growth = r.peak_rss_after_warmup - r.warmup_rss
    expect(growth < RSS_BOUND_BYTES, f"RSS grew {growth / 2**20:.1f} MiB after the warm-up")
    objects = r.peak_objects_after_warmup - r.warmup_objects
    expect(objects < OBJECTS_BOUND, f"{objects} more objects tracked by gc after the warm-up")
    expect(
        r.pushes_tracked + r.dropped == r.pushes_made,
        f"tracked {r.pushes_tracked} + dropped {r.dropped} != made {r.pushes_made}",
    )
    tracked_leaks = sum(r.tracked_leaks.values())
    expect(
        r.pops_tracked == r.pushes_tracked - tracked_leaks,
        f"pops {r.pops_tracked} != tracked pushes {r.pushes_tracked} - leaks {tracked_leaks}",
    )
    in_units = r.tracked_leaks.get("live_thread", 0) + r.tracked_leaks.get("garbage_in_unit", 0)
    expect(
        r.reported.get("leaked:unit_end", 0) == in_units,
        f"{r.reported.get('leaked:unit_end', 0)} leaks reported at unit end, {in_units} made",
    )
    # Outside units a leak is found when its object is collected; see the report for
    # how many of those were found (ids reused before a sweep are not, yet).
    expect(
        r.reported.get("leaked:collected", 0) <= r.tracked_leaks.get("garbage_no_unit", 0),
        "more collected leaks reported than made",
    )
    expect(r.internal_errors == {}, f"internal errors {r.internal_errors}")
    return failures


def describe(r: SoakResult) -> str:
    mib = 2**20
    lines = [
        f"{r.contexts} contexts in {r.seconds} s ({r.contexts / r.seconds / 1000:.0f} k/s), "
        f"ledger cap {r.cap}",
        f"leaks made {r.leaks}, tracked {r.tracked_leaks}",
        f"pushes tracked {r.pushes_tracked} + dropped {r.dropped} = {r.pushes_made}; "
        f"pops tracked {r.pops_tracked}",
        f"reported {dict(sorted(r.reported.items()))}",
        f"tracked contexts: peak {r.peak_tracked}; RSS after warm-up "
        f"{r.warmup_rss / mib:.1f} MiB, peak {r.peak_rss_after_warmup / mib:.1f} MiB; "
        f"gc objects {r.warmup_objects} -> peak {r.peak_objects_after_warmup}",
    ]
    lines += [f"FAILED: {f}" for f in r.failures] or ["OK"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--contexts", type=int, default=1_000_000)
    parser.add_argument("--cap", type=int, default=1000)
    parser.add_argument("--leak-every", type=int, default=100)
    parser.add_argument("--thread-leaks", type=int, default=100)
    parser.add_argument(
        "--task-life", type=int, default=None,
        help="leaks a task's Context outlives (default: twice the cap)",
    )
    parser.add_argument("--sweep-every", type=int, default=100_000)
    parser.add_argument("--sample-every", type=int, default=10_000)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    result = soak(
        contexts=args.contexts,
        cap=args.cap,
        leak_every=args.leak_every,
        thread_leaks=args.thread_leaks,
        task_life=args.task_life,
        sweep_every=args.sweep_every,
        sample_every=args.sample_every,
    )
    print(json.dumps(asdict(result)) if args.json else describe(result))
    return 1 if result.failures else 0


if __name__ == "__main__":
    sys.exit(main())
