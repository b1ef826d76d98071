"""The agent against a hostile registry: forged artifacts and mangled responses, and
still the image's exact bytes, or an error, in bounded time and memory.

`rig.hostile_registry` stands in front of the real registry, which holds a real image
converted by our converter into both accelerated forms, plus a learned profile
(`rig.adversary.publish`). Each hypothesis example re-publishes the image under an
identity of its own (`rig.publication.Edition`) with a plan of

* forgeries (`rig.forgery`): what someone with push rights can publish, digests
  matching the forged content: index-only artifacts (file-table rows, header fields,
  checkpoints, windows, span digests and pieces), eStargz TOCs and twin manifests,
  referrers, profiles;
* faults: what a hostile registry or a man in the middle does to the agent's responses
  in transit (bit flips, truncation, extra bytes, a smuggled second response, wrong
  Content-Range, Content-Type, Content-Encoding or digest header, other status codes,
  a JSON or msgpack field changed without its digest, stalls, trickles, drops);

and `rig.adversary.Arena` plays it: a pull through containerd's CRI with the agent as
snapshotter, in one of three modes (``index``: the index-only artifact, found through
referrers; ``twin``: the full-mode twin `<tag>_accelerated`, found from the image's
tag; ``full``: the twin pulled as the image itself, pinned), then every entry of the
mounted root file system described from a child process that is killed if an entry
takes too long. The example fails if

* an entry that could be read differs from the overlayfs reference (the image as
  containerd's own snapshotter unpacks it: type, mode, owner, size, content, link
  target, device numbers, xattrs, mtime), or an entry appears or goes missing (reads
  may fail with EIO, and the pull may fail or fall back to containerd);
* a FUSE request stayed unanswered past the agent's `demand_timeout` (its watchdog
  counts them, its threshold set just past that), or an entry of the walk hung;
* the agent's peak RSS (VmHWM) reached 512 MiB, it died, or /healthz is not ok;
* a plan with neither forgeries nor faults did not read the whole image, every layer
  served lazily.

Forgeries are held to what docs/threat-model.md promises about them: an index-only
artifact's claims that no read can check (rows of directories, links and whiteouts;
windows and checkpoints with span digests signed again) may show before the background
fill's audit, which must then distrust the artifact within a bound
(`rig.adversary.Arena._excuse_until_caught`); a twin found by its tag is trusted as its
pusher (an open gap: its differences are recorded, not failed). Faults in transit, and
twins pulled by digest, are held to every byte.

Budget: ``ACCELD_ADVERSARY_EXAMPLES`` generated examples (default 50: about 65 s here,
2 cores, with one identity example per mode first); raise it for a longer hunt.
Examples come from the seed ``ACCELD_ADVERSARY_SEED`` (default 0, so that CI fails for
a change, not for a draw; ``random`` draws one, which failures name). To reproduce or
survey a class, ``ACCELD_ADVERSARY_CLASSES`` narrows plans to comma-separated fnmatch
patterns over forgery labels, ``fault.<kind>`` and ``mode:<mode>`` (``index.table.*``,
``fault.flip,mode:full``); ``ACCELD_ADVERSARY_SURVEY=1`` plays every example without
failing. Every example's plan, what the hostile registry served and the verdict are
appended to ``test-logs/adversarial-registry.jsonl``. Two workarounds keep one agent
bug from hiding the others, each with a switch to see the bug itself:
``ACCELD_ADVERSARY_REFRESH_ROOT=0`` (see `rig.adversary.forget_removed_layers`) and
``ACCELD_ADVERSARY_FRESH_CONNECTIONS=0`` (a smuggled response may then carry over into
later examples' connections).
"""

from __future__ import annotations

import asyncio
import fnmatch
import os
import random
from collections.abc import Iterator
from contextlib import ExitStack

import pytest
from hypothesis import HealthCheck, Phase, example, given, seed, settings
from hypothesis import strategies as st

from rig.adversary import Arena, Limits, Plan, Verdict, publish, reference_tree
from rig.agent_process import AgentProcess
from rig.containerd import ACCELD_SNAPSHOTTER, ContainerdServer
from rig.forgery import FORGERIES, MODES, Forgery
from rig.hostile_registry import FOREVER, QUICK_FAULTS, SLOW_FAULTS, Fault, HostileRegistry
from tests.fixtures.registry import LOG_ROOT, running

LIMITS = Limits(demand_timeout=2.0)
EXAMPLES = int(os.environ.get("ACCELD_ADVERSARY_EXAMPLES", "50"))
_SEED_SETTING = os.environ.get("ACCELD_ADVERSARY_SEED", "0")
SEED = random.randrange(1 << 32) if _SEED_SETTING == "random" else int(_SEED_SETTING)
CLASSES = tuple(p for p in os.environ.get("ACCELD_ADVERSARY_CLASSES", "").split(",") if p)
SURVEY = os.environ.get("ACCELD_ADVERSARY_SURVEY") == "1"
REFRESH_ROOT = os.environ.get("ACCELD_ADVERSARY_REFRESH_ROOT", "1") != "0"
FRESH_CONNECTIONS = os.environ.get("ACCELD_ADVERSARY_FRESH_CONNECTIONS", "1") != "0"
LOG = LOG_ROOT / "adversarial-registry.jsonl"
PICK = st.integers(0, 1 << 16)
LAYERS = 4
"""The image's layer count (`rig.adversary.image_spec`)."""


# -- faults ----------------------------------------------------------------------------

_COMMON_TARGETS = (
    "manifest:image",
    "manifest:twin",
    "manifest:referrers",
    "referrers-api",
    "manifest:profile",
    "blob:profile-blob",
    "*",
)
TARGETS = {
    "index": (*_COMMON_TARGETS, "manifest:index", "blob:index-blob*", "range:layer*", "range:*"),
    "twin": (
        *_COMMON_TARGETS,
        "range:estargz*:footer",
        "range:estargz*:toc",
        "range:estargz*:data",
        "range:estargz*",
    ),
}
TARGETS["full"] = TARGETS["twin"]
_QUICK = QUICK_FAULTS
"""Even a quick fault that strikes every request costs the example little time."""
_AMOUNTS: dict[str, st.SearchStrategy[int]] = {
    "flip": st.integers(1, 255),
    "extend": st.sampled_from([1, 100, 70_000]),
    "smuggle": st.sampled_from([10, 5000]),
    "status": st.sampled_from([200, 206, 400, 401, 403, 404, 416, 429, 500, 503]),
    "content-range": st.sampled_from([-1, 1, 512, -4096, 10**6]),
    "content-type": st.integers(0, 4),
    "encoding": st.integers(0, 1),
    "json": PICK,
    "msgpack": PICK,
}
_SECONDS: dict[str, st.SearchStrategy[float]] = {
    "stall": st.sampled_from(
        [0.5 * LIMITS.demand_timeout, 1.5 * LIMITS.demand_timeout, 3 * LIMITS.demand_timeout]
    ),
    "trickle": st.sampled_from([1.0, 1.5 * LIMITS.demand_timeout, 3 * LIMITS.demand_timeout]),
    "smuggle": st.sampled_from([0.0, 0.1]),
}


@st.composite
def fault_specs(draw: st.DrawFn, mode: str) -> Fault:
    kinds = [k for k in (*_QUICK, *SLOW_FAULTS) if _wanted(f"fault.{k}")]
    kind = draw(st.sampled_from(kinds))
    target = draw(st.sampled_from(TARGETS[mode]))
    forever = kind in _QUICK and _metadata(target) and draw(st.booleans())
    return Fault(
        kind,
        target=target,
        times=FOREVER if forever else draw(st.integers(1, 3)),
        at=draw(st.integers(0, 99)) / 100,
        amount=draw(_AMOUNTS.get(kind, st.just(1))),
        seconds=draw(_SECONDS.get(kind, st.just(0.0))),
    )


def _metadata(target: str) -> bool:
    """Whether a fault on ``target`` strikes only metadata requests: one that strikes
    every request for good fails the pull over to containerd at once, where one on
    file data costs every file read the demand timeout (the never-recovering registry
    is `tests/test_agent_chaos.py`'s)."""
    return target.startswith(("manifest:", "blob:", "referrers")) or target.endswith(
        (":footer", ":toc")
    )


def _wanted(label: str) -> bool:
    return not CLASSES or any(fnmatch.fnmatchcase(label, pattern) for pattern in CLASSES)


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    modes = [m for m in MODES if _wanted(f"mode:{m}")] or list(MODES)
    mode = draw(st.sampled_from(modes))
    labels = sorted(
        label for label, (applies, _) in FORGERIES.items() if mode in applies and _wanted(label)
    )
    fault_wanted = any(_wanted(f"fault.{k}") for k in (*_QUICK, *SLOW_FAULTS))
    forgeries = (
        draw(
            st.lists(
                st.builds(Forgery, st.sampled_from(labels), st.tuples(PICK, PICK, PICK)),
                max_size=2,
            )
        )
        if labels
        else []
    )
    faults = draw(st.lists(fault_specs(mode), max_size=2)) if fault_wanted else []
    return Plan(mode, tuple(forgeries), tuple(faults))


@pytest.fixture(scope="module")
def arena(registry, containerd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Arena]:
    work = tmp_path_factory.mktemp("adversary")
    converted, chains = asyncio.run(publish(registry.host, work))
    source = f"{registry.host}/{converted.repository}:{converted.tag}"
    reference = reference_tree(containerd, source, chains["index"], work)
    with ExitStack() as stack:
        hostile = stack.enter_context(HostileRegistry(registry.url))
        agent = stack.enter_context(
            AgentProcess(
                work / "agent", plain_http=[hostile.host], settings=LIMITS.agent_settings()
            )
        )
        lazy = stack.enter_context(
            running(
                ContainerdServer(
                    tmp_path_factory.mktemp("ctrd"),
                    snapshotter=ACCELD_SNAPSHOTTER,
                    acceld_socket=agent.socket,
                )
            )
        )
        yield Arena(
            work,
            converted,
            chains,
            reference,
            hostile,
            agent,
            lazy,
            LIMITS,
            LOG,
            {"seed": SEED},
            refresh_root=REFRESH_ROOT,
        )


def _served_whole(verdict: Verdict) -> bool:
    """Whether the example's image was read whole, every layer served lazily."""
    return verdict.read and not verdict.eio and verdict.lazy_layers == LAYERS


# No shrinking: every example costs a pull, and a failing plan is short enough to read
# as it was drawn. No database: the seed alone says which examples run.
ADVERSARY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)


@seed(SEED)
@ADVERSARY
@given(plan=plans())
@example(plan=Plan("index"))
@example(plan=Plan("twin"))
@example(plan=Plan("full"))
def test_a_hostile_registry_never_gets_wrong_bytes_served(arena: Arena, plan: Plan) -> None:
    verdict = arena.run(plan, fresh_connections=FRESH_CONNECTIONS)
    problems = list(verdict.violations)
    if not plan.forgeries and not plan.faults and not _served_whole(verdict):
        problems.append(f"an honest registry: {verdict}")
    assert SURVEY or not problems, (
        f"example {verdict.example} (seed {SEED}): {plan.describe()}\n"
        f"forged: {verdict.forged}\npull error: {verdict.pull_error!r}\n"
        f"EIO: {verdict.eio[:10]}\nnotes: {verdict.notes}\n" + "\n".join(problems[:25])
    )
