"""The worlds as the trainer and the sweep see them: batches, conditions drawn as batches draw them, judges."""

import torch

from anystep.worlds import WORLDS, Judge, World, make_world
from anystep.worlds.gmm import GMMData
from anystep.worlds.shapes import ShapesData


def test_every_registered_world_is_a_world():
    for name, entry in WORLDS.items():
        world = make_world(name, {s: cls() for s, cls in entry.sections.items()})
        assert world.network == entry.network and world.name == name
        if name != "wan":   # the wan world opens its latent cache on first use (world.wan.data)
            assert isinstance(world, World)
            assert (world.exact_teacher() is not None) == entry.exact_teacher, name
            judge = world.judge()
            assert isinstance(judge, Judge) and judge.picture_samples >= 1, name
            assert judge.marks().shape[1] >= 0 and len(judge.labels(world.eval_set(3, 0))) == 3


def test_gmm_judge_endpoint_error_equals_the_worlds_own():
    world = GMMData()
    judge, ev = world.judge(), world.eval_set(32, 0)
    samples = ev.noise * 0.1
    for w in (1.0, 3.0):
        cached = judge.score(samples, ev, w)["endpoint_error"]
        assert abs(cached - world.world.endpoint_error(samples, ev.noise, ev.meta, w)) < 1e-12
        assert judge.score(samples, ev, w)["endpoint_error"] == cached


def test_shapes_batches_are_real_clips_with_their_prompt_embeddings():
    world = ShapesData()
    x0, cond = world.batch(8, torch.Generator().manual_seed(0))
    assert x0.shape == (8, *world.shape) and cond.shape == (8, 8, 32)
    assert (world.null_cond == 0).all()
    ev = world.eval_set(8, 0)
    assert world.judge().score(world.world.render(ev.meta), ev, 1.0)["total"] > 0.99


def test_conditions_are_a_batchs_conditions_and_leave_the_same_random_stream():
    """Stage 2's critic step draws only conditions: the same prompts as a full batch, and the generator ends
    where a full batch leaves it (the run's random stream does not depend on it)."""
    for world in (GMMData(), ShapesData()):
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        _, cond = world.batch(6, g1)
        assert torch.equal(world.conditions(6, g2), cond)
        assert torch.equal(g1.get_state(), g2.get_state())
