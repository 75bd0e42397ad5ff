"""Packing: round trips for every width and ragged lengths; 4-bit equals ONNX FLOAT4E2M1 bytes."""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from onnx import numpy_helper

from exporter.formats import get_format
from exporter.packing import pack, packed_length, unpack


@settings(max_examples=200, deadline=None)
@given(bits=st.integers(2, 8), rows=st.integers(1, 4), length=st.integers(1, 70), data=st.data())
def test_pack_unpack_roundtrip_any_width_and_ragged_length(bits, rows, length, data):
    codes = data.draw(arrays(np.uint8, (rows, length), elements=st.integers(0, (1 << bits) - 1)))
    packed = pack(codes, bits)
    assert packed.dtype == np.uint8 and packed.shape == (rows, packed_length(length, bits))
    np.testing.assert_array_equal(unpack(packed, bits, length), codes)
    # along another axis too
    np.testing.assert_array_equal(unpack(pack(codes.T, bits, axis=0), bits, length, axis=0), codes.T)


@pytest.mark.parametrize("length", [1, 2, 7, 16, 33])
def test_four_bit_layout_matches_onnx_float4e2m1_byte_for_byte(length):
    rng = np.random.default_rng(length)
    fmt = get_format("e2m1")
    values = fmt.decode(rng.integers(0, 16, length).astype(np.uint8))
    onnx_bytes = numpy_helper.from_array(values.astype(ml_dtypes.float4_e2m1fn)).raw_data
    assert pack(fmt.encode(values), 4).tobytes() == onnx_bytes


def test_bit_stream_layout_as_documented():
    # docs/formats.md: element i occupies stream bits [i*b, (i+1)*b), LSB first
    assert pack(np.array([1, 2, 3, 15, 4], np.uint8), 4).tolist() == [0x21, 0xF3, 0x04]
    assert pack(np.array([1, 2, 3, 0], np.uint8), 2).tolist() == [0b00111001]
    # 3-bit: 8 codes in exactly 3 bytes; code 7 at element 2 straddles bytes 0 and 1
    packed = pack(np.array([0, 0, 7, 0, 0, 0, 0, 5], np.uint8), 3)
    assert packed.tolist() == [0b11000000, 0b00000001, 0b10100000]
    # padding bits of a ragged last byte are zero
    assert pack(np.array([7], np.uint8), 3).tolist() == [7]


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="2..8"):
        pack(np.zeros(4, np.uint8), 9)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack(np.array([16], np.uint8), 4)
    with pytest.raises(TypeError, match="integer codes"):
        pack(np.array([1.0]), 4)
    with pytest.raises(ValueError, match="need 2 bytes"):
        unpack(np.zeros(3, np.uint8), 4, 4)
