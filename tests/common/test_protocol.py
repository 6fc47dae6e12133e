import logging

import msgpack
import numpy as np
import pytest
import zmq

from common.protocol import (ALLOWED_DTYPES, PROTOCOL_VERSION, DropCounter, Limits, Message,
                             ProtocolError, decode, encode)

SHAPES = [(), (0,), (1,), (7,), (2, 3, 4), (0, 5), (3, 0, 2)]


def random_array(dtype: np.dtype, shape: tuple, rng: np.random.Generator) -> np.ndarray:
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return rng.standard_normal(shape).astype(dtype)


def header(**overrides) -> bytes:
    h = {"version": PROTOCOL_VERSION, "kind": "segment", "sender": "t", "policy_version": 0,
         "meta": {}, "arrays": [["x", "<f4", [2]]]}
    h.update(overrides)
    return msgpack.packb(h, use_bin_type=True)


GOOD_ARRAY = np.zeros(2, np.float32).tobytes()


def reason_of(frames, limits=Limits()) -> str:
    with pytest.raises(ProtocolError) as info:
        decode(frames, limits)
    assert info.value.reason in ProtocolError.REASONS
    return info.value.reason


def test_allowed_dtypes_are_little_endian_and_complete():
    names = {np.dtype(d).name for d in ALLOWED_DTYPES.values()}
    assert names == {"bool", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64",
                     "float16", "float32", "float64"}
    assert all(d.byteorder in "<|=" for d in ALLOWED_DTYPES.values())


@pytest.mark.parametrize("dtype", sorted(ALLOWED_DTYPES))
def test_round_trip_every_dtype_and_shape(dtype):
    rng = np.random.default_rng(0)
    arrays = {f"a{i}": random_array(np.dtype(dtype), s, rng) for i, s in enumerate(SHAPES)}
    msg = Message("segment", sender="actor-1", policy_version=12,
                  meta={"env": 3, "name": "x", "list": [1, 2.5, "z"], "flag": True}, arrays=arrays)
    out = decode(encode(msg))
    assert (out.kind, out.sender, out.policy_version, out.meta) == ("segment", "actor-1", 12, msg.meta)
    assert list(out.arrays) == list(arrays)
    for name, a in arrays.items():
        b = out.arrays[name]
        assert b.dtype == a.dtype and b.shape == a.shape, name
        np.testing.assert_array_equal(b, a)


def test_round_trip_over_frame_types():
    a = np.arange(12, dtype=np.int32).reshape(3, 4)
    frames = encode(Message("episode", arrays={"a": a}))
    for convert in (bytes, memoryview, bytearray, lambda f: zmq.Frame(bytes(f))):
        out = decode([convert(f) for f in frames])
        np.testing.assert_array_equal(out.arrays["a"], a)


def test_encode_does_not_copy_contiguous_arrays_and_decode_views_frames():
    a = np.arange(1000, dtype=np.float32)
    frames = encode(Message("segment", arrays={"a": a}))
    assert np.shares_memory(np.asarray(frames[1]), a)
    buf = bytearray(frames[1].tobytes())
    out = decode([frames[0], buf])
    buf[:4] = np.float32(-1).tobytes()  # the decoded array is a view of the frame
    assert out.arrays["a"][0] == -1


def test_noncontiguous_and_big_endian_inputs_arrive_as_equal_arrays():
    a = np.arange(24, dtype=np.float64).reshape(4, 6).T  # Fortran order
    b = np.arange(5, dtype=">i4")
    out = decode(encode(Message("segment", arrays={"a": a, "b": b})))
    np.testing.assert_array_equal(out.arrays["a"], a)
    np.testing.assert_array_equal(out.arrays["b"], b)
    assert out.arrays["b"].dtype == np.dtype("<i4")


def test_decoded_arrays_view_zmq_frames():
    frames = [zmq.Frame(f) for f in encode(Message("segment", arrays={"a": np.ones(3, np.float32)}))]
    out = decode(frames)
    assert np.shares_memory(out.arrays["a"], np.frombuffer(frames[1].buffer, np.uint8))


def test_numpy_scalars_are_sent_as_0d_arrays():
    out = decode(encode(Message("segment", arrays={"s": np.float32(2.5), "b": np.bool_(True)})))
    assert out.arrays["s"].shape == () and out.arrays["s"] == 2.5 and out.arrays["b"].dtype == bool


@pytest.mark.parametrize("frames, reason", [
    ([b"\xc1"], "not_msgpack"),
    ([b"\x92\x01"], "not_msgpack"),  # truncated array
    ([msgpack.packb([1, 2, 3])], "bad_header"),
    ([header(extra=1), GOOD_ARRAY], "bad_header"),
    ([msgpack.packb({"version": 1, "kind": "segment"})], "bad_header"),
    ([header(version=True), GOOD_ARRAY], "bad_header"),
    ([header(version=2), GOOD_ARRAY], "bad_version"),
    ([header(kind="pickle"), GOOD_ARRAY], "bad_kind"),
    ([header(kind=3), GOOD_ARRAY], "bad_header"),
    ([header(sender=5), GOOD_ARRAY], "bad_header"),
    ([header(policy_version="7"), GOOD_ARRAY], "bad_header"),
    ([header(meta=[1]), GOOD_ARRAY], "bad_header"),
    ([header(arrays={"x": 1}), GOOD_ARRAY], "bad_header"),
    ([header(arrays=[["x", "<f4"]]), GOOD_ARRAY], "bad_header"),
    ([header(arrays=[["x", "<f4", [-2]]]), GOOD_ARRAY], "bad_header"),
    ([header(arrays=[["x", "<f4", [2.0]]]), GOOD_ARRAY], "bad_header"),
    ([header(arrays=[["x", "<f4", 2]]), GOOD_ARRAY], "bad_header"),
    ([], "frame_count"),
    ([header()], "frame_count"),
    ([header(), GOOD_ARRAY, GOOD_ARRAY], "frame_count"),
    ([header(arrays=[["x", "<c8", [1]]]), GOOD_ARRAY], "dtype"),
    ([header(arrays=[["x", ">f4", [2]]]), GOOD_ARRAY], "dtype"),
    ([header(arrays=[["x", "|O", [1]]]), GOOD_ARRAY], "dtype"),
    ([header(arrays=[["x", 4, [2]]]), GOOD_ARRAY], "dtype"),
    ([header(arrays=[["x", "<f4", [3]]]), GOOD_ARRAY], "shape_mismatch"),
    ([header(arrays=[["x", "<f8", [2]]]), GOOD_ARRAY], "shape_mismatch"),
    ([header(arrays=[["x", "<f4", []]]), GOOD_ARRAY], "shape_mismatch"),
    ([header(arrays=[["x", "<f8", [2**62, 2**62]]]), GOOD_ARRAY], "array_too_large"),
    ([header(arrays=[["", "<f4", [2]]]), GOOD_ARRAY], "bad_name"),
    ([header(arrays=[[7, "<f4", [2]]]), GOOD_ARRAY], "bad_name"),
    ([header(arrays=[["a\nb", "<f4", [2]]]), GOOD_ARRAY], "bad_name"),
    ([header(arrays=[["x", "<f4", [2]], ["x", "<f4", [2]]]), GOOD_ARRAY, GOOD_ARRAY], "bad_name"),
])
def test_rejections(frames, reason):
    assert reason_of(frames) == reason


def test_size_limits():
    a = np.zeros(1024, np.uint8)
    frames = encode(Message("segment", arrays={"a": a, "b": a, "c": a}))
    assert reason_of(frames, Limits(max_array_bytes=1000)) == "array_too_large"
    assert reason_of(frames, Limits(max_message_bytes=3000)) == "message_too_large"
    assert reason_of(frames, Limits(max_arrays=2)) == "too_many_arrays"
    assert reason_of(frames, Limits(max_header_bytes=20)) == "header_too_large"
    assert len(decode(frames, Limits(max_array_bytes=1024, max_message_bytes=4096, max_arrays=3)).arrays) == 3


def test_error_message_names_the_array_and_sizes():
    with pytest.raises(ProtocolError) as info:
        decode([header(arrays=[["reward", "<f4", [3]]]), GOOD_ARRAY])
    assert "reward" in str(info.value) and "12" in str(info.value) and "8" in str(info.value)


def test_encode_rejects_what_decode_would():
    with pytest.raises(ProtocolError) as info:
        encode(Message("segment", arrays={"z": np.zeros(2, np.complex64)}))
    assert info.value.reason == "dtype"
    with pytest.raises(ProtocolError) as info:
        encode(Message("segment", arrays={"o": np.array([None, 1], dtype=object)}))
    assert info.value.reason == "dtype"
    with pytest.raises(ProtocolError) as info:
        encode(Message("nonsense"))
    assert info.value.reason == "bad_kind"
    with pytest.raises(ProtocolError) as info:
        encode(Message("segment", arrays={"": np.zeros(1)}))
    assert info.value.reason == "bad_name"


def test_limits_from_config():
    cfg = {"transport": {"limits": {"max_arrays": 5, "max_header_bytes": 100}}}
    limits = Limits.from_config(cfg)
    assert limits.max_arrays == 5 and limits.max_header_bytes == 100
    assert limits.max_array_bytes == Limits().max_array_bytes


def test_drop_counter_counts_and_rate_limits_warnings(caplog):
    drops = DropCounter("test", log_interval_s=60)
    with caplog.at_level(logging.WARNING, logger="common.protocol"):
        for _ in range(100):
            drops.record(ProtocolError("dtype", "x"), peer="p")
        drops.record("stale_version")
    assert drops.counts == {"dtype": 100, "stale_version": 1} and drops.total == 101
    assert len(caplog.records) == 2  # one per reason, not one per drop
    assert "dtype" in caplog.records[0].getMessage()
