import torch

from anystep.config import WorldConfig
from anystep.worlds.binding import make_binding


def test_gmm_binding_endpoint_error_equals_the_worlds_own():
    b = make_binding(WorldConfig(name="gmm"))
    ev = b.eval_set(32, 0)
    samples = ev.noise * 0.1
    for w in (1.0, 3.0):
        cached = b.evaluate(samples, ev, w)["endpoint_error"]
        assert abs(cached - b.world.endpoint_error(samples, ev.noise, ev.meta, w)) < 1e-12
        assert b.evaluate(samples, ev, w)["endpoint_error"] == cached


def test_shapes_binding_batches_are_real_clips_with_their_prompt_embeddings():
    b = make_binding(WorldConfig(name="shapes"))
    x0, cond = b.batch(8, torch.Generator().manual_seed(0))
    assert x0.shape == (8, *b.shape) and cond.shape == (8, 8, 32)
    assert (b.null_cond == 0).all()
    ev = b.eval_set(8, 0)
    assert b.evaluate(b.world.render(ev.meta), ev, 1.0)["total"] > 0.99
