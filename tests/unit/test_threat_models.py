"""Threat models are enforced: an attack holds only what its threat model grants, as private copies.

Tested the hard way: walk everything reachable from an attack object (attributes, `__dict__`, slots, closures,
bound methods, containers, module children) and find none of the victim's objects or tensor storage; and run
attacks that cheat through each door the old `restrict`-only scheme left open. Each cheat must fail.
"""

import functools
import types

import pytest
import torch

from splitveil.attack.base import Capabilities, SealedQuery, Target, ThreatModel
from splitveil.attack.image import IMAGE_ATTACKS, ImageTarget
from splitveil.attack.image.inverse import InverseNetworkAttack
from splitveil.attack.image.rmle import RegularisedMLEAttack
from splitveil.attack.image.shadow import ShadowModelAttack
from splitveil.attack.text import TEXT_ATTACKS, ExactInversion, TailReadout, TextTarget
from splitveil.core.errors import ConfigError
from splitveil.data.images import load_dataset, split_dataset
from splitveil.edge.generate import SplitCausalLM
from splitveil.protect.text import observe
from splitveil.models.vision_zoo import build_vision_model
from splitveil.plan.plan import SplitPlan, apply

_LEAVES = (type, types.ModuleType, str, bytes, bytearray, int, float, complex, bool, type(None), torch.dtype,
           torch.device, torch.Size)


def reachable(root, limit: int = 500_000) -> list:
    """Every object reachable from `root` without gc or module globals: attributes (`__dict__`, slots), closure
    cells, bound methods' `__self__`/`__func__`, partials, containers. Tensors are leaves."""
    seen, found, stack = set(), [], [root]
    while stack:
        obj = stack.pop()
        if isinstance(obj, _LEAVES) or id(obj) in seen:
            continue
        seen.add(id(obj))
        found.append(obj)
        assert len(found) < limit, "object graph too large to walk"
        if isinstance(obj, torch.Tensor):
            continue
        if isinstance(obj, dict):
            stack += [*obj.keys(), *obj.values()]
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack += list(obj)
        if isinstance(obj, types.FunctionType):
            stack += [cell.cell_contents for cell in obj.__closure__ or () if _filled(cell)]
            stack += [obj.__defaults__, obj.__kwdefaults__]
        if isinstance(obj, types.MethodType):
            stack += [obj.__self__, obj.__func__]
        if isinstance(obj, functools.partial):
            stack += [obj.func, obj.args, obj.keywords]
        attributes = getattr(obj, "__dict__", None)
        if isinstance(attributes, dict):
            stack.append(attributes)
        for cls in type(obj).__mro__:
            for slot in getattr(cls, "__slots__", ()):
                if isinstance(slot, str) and slot not in ("__dict__", "__weakref__") and hasattr(obj, slot):
                    stack.append(getattr(obj, slot))
    return found


def _filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def storages(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors if t.device.type != "meta" and t.numel()}


def assert_holds_nothing_of(attack, victim_objects, victim_tensors):
    """Nothing reachable from `attack` is one of `victim_objects` or shares storage with `victim_tensors`."""
    graph = reachable(attack)
    ids = {id(o) for o in graph}
    assert not [o for o in victim_objects if id(o) in ids], "a victim object is reachable from the attack"
    shared = storages(t for t in graph if isinstance(t, torch.Tensor)) & storages(victim_tensors)
    assert not shared, f"{len(shared)} tensor(s) share storage with the victim's"


def cheat_fails(cheat, truth: torch.Tensor) -> bool:
    """True when `cheat()` raises for lack of access, returns None, or returns anything but `truth`."""
    try:
        stolen = cheat()
    except (AttributeError, TypeError, IndexError, RuntimeError, NotImplementedError, StopIteration):
        return True
    return stolen is None or not isinstance(stolen, torch.Tensor) or stolen.shape != truth.shape \
        or not torch.allclose(stolen, truth)


# ---------------------------------------------------------------------------------------------------- images


@pytest.fixture(scope="module")
def split_cnn():
    splits = split_dataset(load_dataset("digits"), train=200, aux=200, test=60, seed=0)
    torch.manual_seed(0)
    model = build_vision_model("vgg", (1, 8, 8), 10).eval()
    edge, cloud = apply(model, SplitPlan.two_way(2))
    target = ImageTarget.from_parts(edge, cloud, image_shape=(1, 8, 8), aux=splits.aux)
    images = splits.test.images[:16]
    with torch.no_grad():
        features, logits = edge(images), model(images)
    return {"model": model, "edge": edge, "cloud": cloud, "target": target, "images": images,
            "features": features, "logits": logits}


def _victim_tensors(model):
    return [*model.parameters(), *model.buffers()]


@pytest.mark.parametrize("name", ["rmle", "inverse", "shadow", "cgan"])
def test_an_image_attack_reaches_nothing_of_the_victim(split_cnn, name):
    attack = IMAGE_ATTACKS.get(name)(split_cnn["target"])
    assert isinstance(attack.target, Capabilities)
    assert_holds_nothing_of(attack, [split_cnn["model"], split_cnn["edge"], split_cnn["cloud"], split_cnn["target"],
                                     split_cnn["target"].query], _victim_tensors(split_cnn["model"]))


def test_granted_parts_are_copies_of_exactly_the_granted_segments(split_cnn):
    edge = IMAGE_ATTACKS.get("rmle")(split_cnn["target"]).target.edge
    cloud = IMAGE_ATTACKS.get("shadow")(split_cnn["target"]).target.cloud
    images, features = split_cnn["images"], split_cnn["features"]
    with torch.no_grad():
        assert torch.equal(edge(images), features)  # same weights, same arithmetic
        assert torch.equal(cloud(features), split_cnn["logits"])
    model = split_cnn["model"]
    assert sum(p.numel() for p in edge.owner.parameters()) == sum(p.numel() for p in split_cnn["edge"].parameters())
    assert sum(p.numel() for p in cloud.owner.parameters()) == sum(p.numel() for p in split_cnn["cloud"].parameters())
    assert edge.owner is not model and cloud.owner is not model


def test_a_sealed_query_answers_like_the_edge_and_holds_no_module(split_cnn):
    query = IMAGE_ATTACKS.get("inverse")(split_cnn["target"]).target.query
    assert isinstance(query, SealedQuery)
    assert torch.equal(query(split_cnn["images"]), split_cnn["features"])
    assert not [o for o in reachable(query) if isinstance(o, torch.nn.Module)]
    assert not [o for o in reachable(query) if isinstance(o, torch.Tensor)]
    query.close()


class CloudOwnerCheat(ShadowModelAttack):
    """Query-free by declaration, but runs the edge through the cloud part's owner (the whole model, formerly)."""

    def steal(self, images):
        cloud = self.target.cloud
        with torch.no_grad():
            return cloud.owner.run(images, 0, cloud.start)


class QueryClosureCheat(InverseNetworkAttack):
    """Black box by declaration, but digs the edge part out of the query function's closure and reads its weights."""

    def steal(self, images):
        cells = [c.cell_contents for c in self.target.query.__closure__]  # AttributeError: no closure to dig in
        edge = next(o for o in reachable(cells) if hasattr(o, "parameters") and callable(o))  # through wrappers too
        with torch.no_grad():
            return edge(images)


class EdgeOwnerCheat(RegularisedMLEAttack):
    """Holds the edge's weights, but reads the cloud's weights through the edge part's owner to get the labels."""

    def steal(self, images):
        with torch.no_grad():
            return self.target.edge.owner(images)


@pytest.mark.parametrize("cheat, truth", [(CloudOwnerCheat, "features"), (QueryClosureCheat, "features"),
                                          (EdgeOwnerCheat, "logits")])
def test_an_image_attack_that_cheats_through_a_door_fails(split_cnn, cheat, truth):
    attack = cheat(split_cnn["target"])
    assert cheat_fails(lambda: attack.steal(split_cnn["images"]), split_cnn[truth])


def test_the_edge_owner_holds_no_cloud_weights(split_cnn):
    edge = IMAGE_ATTACKS.get("rmle")(split_cnn["target"]).target.edge
    assert list(edge.owner.segments[edge.end:]) == []
    assert not storages(edge.owner.parameters()) & storages(split_cnn["cloud"].parameters())


def test_a_target_refuses_what_it_cannot_observe(split_cnn):
    class DownlinkAttack(RegularisedMLEAttack):
        name = "downlink-reader"
        threat_model = ThreatModel(observes="downlink", knows_head_weights=True)

    with pytest.raises(ConfigError, match="the downlink-reader attack needs a view of the downlink"):
        DownlinkAttack(split_cnn["target"])


def test_a_generic_target_grants_only_what_is_declared():
    class Box(Target):
        offers = {"auxiliary_data": ("aux", "auxiliary data"), "knows_head_weights": ("edge", "the edge")}

        def offered(self, field):
            return field == "aux"

        def copy_of(self, field):
            return [1, 2, 3]

    granted = Box().grant(ThreatModel(observes="uplink", auxiliary_data=True), "probe")
    assert granted.aux == [1, 2, 3] and granted.edge is None
    with pytest.raises(AttributeError):
        granted.edge = "stolen"
    with pytest.raises(ConfigError, match="the probe attack needs the edge, which this target does not give"):
        Box().grant(ThreatModel(observes="uplink", knows_head_weights=True), "probe")


# ---------------------------------------------------------------------------------------------------- text


def _prompt(seed, length=10):
    return torch.randint(3, 101, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


class _Ids:
    eos_token_id = None

    def decode(self, ids, **kwargs):
        return " ".join(map(str, ids))


@pytest.fixture()
def observed_split(tiny_models):
    """A Λ-split that has run: its live head part's KV cache holds the prompt."""
    lm = SplitCausalLM(tiny_models["llama"], SplitPlan.lambda_split(1, 3))
    lm.tokenizer = _Ids()
    prompt = _prompt(3)
    seen = observe(lm, prompt, 3)
    head = lm.stages[0]
    assert head.seq_len >= len(prompt)  # the live part still holds the session's prefix
    return {"lm": lm, "prompt": prompt, "seen": seen, "head": head, "model": tiny_models["llama"]}


def _cache_tensors(part):
    return [t for layer in part.cache.layers for t in (layer.keys, layer.values) if t is not None]


class CacheCheat(ExactInversion):
    """Reads the prompt out of the live head part's KV cache: a layer-0 key depends only on the token and its
    position, so matching the cache against every token's key gives the prompt without inverting anything."""

    def __init__(self, target, **options):
        self.live = target if hasattr(target, "cache") else None  # the part it was handed, if it was handed one
        super().__init__(target, **options)

    def steal(self, length: int):
        live = self.live or next(o for o in reachable(self) if getattr(o, "seq_len", 0) >= length and o is not self.head)
        keys = live.cache.layers[0].keys[0]  # [kv heads, positions, head dim]
        vocabulary = live.input_embeddings.shape[0]
        tokens = []
        for position in range(length):
            probe = live.clone()
            probe.seq_len = position
            probe(torch.arange(vocabulary)[:, None])  # every token at this position, one batch row each
            candidates = probe.cache.layers[0].keys[:, :, 0]  # [V, kv heads, head dim]
            tokens.append(int((candidates - keys[:, position]).flatten(1).norm(dim=1).argmin()))
        return torch.tensor(tokens)


def test_a_text_attack_that_reads_the_live_cache_fails(observed_split):
    attack = CacheCheat(TextTarget.from_split(observed_split["lm"]), candidates=8)
    prompt = torch.tensor(observed_split["prompt"])
    assert cheat_fails(lambda: attack.steal(len(prompt)), prompt)


def test_the_cache_cheat_works_when_handed_the_live_part(observed_split):
    """The cheat is real: handed the victim's live head part (what attacks were given before), it reads the prompt
    from the cache without any inversion."""
    prompt = observed_split["prompt"]
    attack = CacheCheat(observed_split["head"], candidates=8)  # a bare part: only its weights are granted ...
    assert attack.steal(len(prompt)).tolist() == prompt  # ... but a constructor that keeps its argument can cheat


@pytest.mark.parametrize("name", ["nearest", "exact"])
def test_a_text_attack_reaches_nothing_of_the_victim(observed_split, name):
    lm, model = observed_split["lm"], observed_split["model"]
    attack = TEXT_ATTACKS.get(name)(TextTarget.from_split(lm))
    victim_tensors = [*model.parameters(), *_cache_tensors(observed_split["head"])]
    assert_holds_nothing_of(attack, [model, lm, observed_split["head"], lm.splittable, *lm.stages], victim_tensors)
    seen, prompt = observed_split["seen"], observed_split["prompt"]
    if name == "exact":  # and it still works
        assert attack.reconstruct(seen.uplink[: len(prompt)]) == prompt


def test_the_granted_head_holds_no_trunk_or_tail_weights(observed_split):
    lm = observed_split["lm"]
    head = ExactInversion(TextTarget.from_split(lm)).head
    copy = head.owner
    real = [p for p in copy.model.parameters() if p.device.type != "meta"]
    expected = {id(p) for m in copy.modules_for(head.start, head.end) for p in m.parameters()}
    assert real and {id(p) for p in real} <= expected  # only the embedding and the head's layers hold data
    trunk_and_tail = [p for m in lm.splittable.modules_for(head.end, len(lm.splittable.segment_names)) for p in m.parameters()]
    with pytest.raises((NotImplementedError, RuntimeError)):  # a cheat running the trunk from the copy has no data
        type(head)(copy, head.end, len(copy.segment_names))(observed_split["seen"].uplink[None, :2])
    assert trunk_and_tail and not storages(real) & storages(trunk_and_tail)


def test_the_granted_tail_reads_like_the_live_tail(tiny_models):
    lm = SplitCausalLM(tiny_models["qwen2"], SplitPlan.lambda_split(1, 3))
    lm.tokenizer = _Ids()
    prompt = _prompt(11)
    seen = observe(lm, prompt, 6)
    readout = TailReadout(TextTarget.from_split(lm))
    assert readout.reconstruct(seen.downlink)[len(prompt) - 1:][: len(seen.generated_ids)] == seen.generated_ids
    assert_holds_nothing_of(readout, [lm.stages[2], lm.splittable], list(tiny_models["qwen2"].parameters()))


def test_a_text_target_that_lacks_a_part_is_refused(observed_split):
    splittable = observed_split["lm"].splittable
    with pytest.raises(ConfigError, match="the exact attack needs the public head"):
        ExactInversion(TextTarget(splittable, head_end=None, tail_start=4))
    with pytest.raises(ConfigError, match="the tail-readout attack needs the public tail"):
        TailReadout(TextTarget(splittable, head_end=2))
    with pytest.raises(ConfigError, match="a text attack needs a TextTarget or a causal-LM part"):
        ExactInversion(object())


def test_a_query_process_ends_when_its_parent_is_killed():
    """A killed attack run leaves no query process behind, even when another process still holds the write end of
    its stdin (here a forked child of the parent, as a fork-started worker pool's process does)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    code = ("import sys, time, torch; from splitveil.attack.base import SealedQuery; "
            "q = SealedQuery(torch.nn.Linear(2, 2)); "
            "import os; holder = os.fork(); "
            "(time.sleep(60), os._exit(0)) if holder == 0 else None; "
            "print(q._process.pid, holder, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        child, holder = map(int, parent.stdout.readline().split())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                return
            with open(f"/proc/{child}/stat") as stat:
                if stat.read().split(")")[1].split()[0] == "Z":  # exited, not yet reaped by init
                    return
            time.sleep(0.2)
        raise AssertionError(f"query process {child} outlived its killed parent")
    finally:
        parent.kill()
        try:
            os.kill(holder, signal.SIGKILL)
        except (NameError, ProcessLookupError):
            pass
