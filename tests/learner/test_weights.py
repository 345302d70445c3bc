"""Weight packing: one buffer per dtype, exact round trip, zero-copy views on the way out."""

import numpy as np
import pytest
import torch

from learner.weights import VersionStore, pack_weights, unpack_weights


def named():
    g = torch.Generator().manual_seed(0)
    return [
        ("a.weight", torch.randn(3, 4, generator=g)),
        ("b.bias", torch.randn(5, generator=g)),
        ("c.weight", torch.randn(2, 3, generator=g).to(torch.bfloat16)),
        ("d.weight", torch.randn(7, generator=g).to(torch.bfloat16)),
    ]


def test_round_trip_is_exact_for_fp32_and_bf16():
    packed = pack_weights(named(), version=3)
    assert packed.version == 3
    assert set(packed.buffers) == {"float32", "bfloat16"}
    assert packed.buffers["bfloat16"].dtype == np.int16  # bf16 bits travel as int16
    out = dict(unpack_weights(packed))
    for name, t in named():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape
        assert torch.equal(out[name], t)
    assert packed.nbytes == 12 * 4 + 5 * 4 + 6 * 2 + 7 * 2


def test_unpacked_tensors_are_views_of_the_buffers():
    packed = pack_weights(named(), version=1)
    base = packed.buffers["float32"].ctypes.data
    out = dict(unpack_weights(packed))
    assert out["a.weight"].data_ptr() == base
    assert out["b.bias"].data_ptr() == base + 12 * 4


def test_cast_on_pack_for_engines_of_another_dtype():
    """A mixed-precision learner's float32 weights travel as bfloat16 (half the bytes) to bfloat16 engines."""
    packed = pack_weights(named(), version=2, dtype=torch.bfloat16)
    assert set(packed.buffers) == {"bfloat16"} and packed.nbytes == (12 + 5 + 6 + 7) * 2
    out = dict(unpack_weights(packed))
    for name, t in named():
        assert out[name].dtype == torch.bfloat16 and torch.equal(out[name], t.to(torch.bfloat16))


def test_unsupported_dtype_is_refused():
    with pytest.raises(TypeError, match="int64"):
        pack_weights([("x", torch.zeros(2, dtype=torch.int64))], 1)


def test_version_store_keeps_the_last_k():
    store = VersionStore(keep=2)
    with pytest.raises(LookupError):
        store.latest()
    for v in (1, 2, 3):
        store.add(v, f"ref{v}")
    assert store.latest() == (3, "ref3")
    assert list(store._refs) == [2, 3]


def test_reused_buffers_give_each_version_its_own_values():
    """``reuse`` keeps the host buffers between packs: the second pack writes the same memory, and what was put
    before it (a copy) keeps the first version's values; a pack of other sizes or dtypes gets new buffers."""
    buffers: dict[str, torch.Tensor] = {}
    first = pack_weights(named(), version=1, reuse=buffers)
    ptr = first.buffers["float32"].ctypes.data
    put = {k: v.copy() for k, v in first.buffers.items()}  # what ray.put would hold
    doubled = [(n, 2 * t) for n, t in named()]
    second = pack_weights(doubled, version=2, reuse=buffers)
    assert second.buffers["float32"].ctypes.data == ptr
    out = dict(unpack_weights(second))
    for name, t in doubled:
        assert torch.equal(out[name], t)
    kept = dict(unpack_weights(type(first)(1, put, first.index)))
    for name, t in named():
        assert torch.equal(kept[name], t)
    cast = pack_weights(named(), version=3, dtype=torch.bfloat16, reuse=buffers)
    assert set(buffers) == {"bfloat16"} and buffers["bfloat16"].numel() == 12 + 5 + 6 + 7
    assert cast.buffers["bfloat16"].ctypes.data == buffers["bfloat16"].data_ptr()


def test_what_ray_put_holds_survives_the_next_pack_into_the_same_buffers():
    """The learner packs each version into the buffers of the last one, which is safe only because ``ray.put``
    copies: an object inlined in the owner's memory (small) and one in the shared-memory store (large)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        buffers: dict[str, torch.Tensor] = {}
        for size in (10, 300_000):
            ref = ray.put(pack_weights([("w", torch.arange(size, dtype=torch.float32))], 1, reuse=buffers))
            pack_weights([("w", -torch.arange(size, dtype=torch.float32))], 2, reuse=buffers)
            got = dict(unpack_weights(ray.get(ref, timeout=60)))["w"]
            assert torch.equal(got, torch.arange(size, dtype=torch.float32))
    finally:
        if started:
            ray.shutdown()
