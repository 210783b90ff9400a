import numpy as np
import pytest

from tfbitmeta.errors import TfbitmetaError
from tfbitmeta.quant.bitwidth import DEFAULT_BITS, FP, BitSpace, is_valid_pair, parse_config


def test_reference_candidate_counts():
    assert len(BitSpace(DEFAULT_BITS).configs) == 75  # Yu21 with 1-bit (docs/method.md, "Tasks")
    assert len(BitSpace(tuple(b for b in DEFAULT_BITS if b != 1)).configs) == 73  # SAT / LSQ
    assert BitSpace(DEFAULT_BITS, w_eq_a=True).configs == [(b, b) for b in DEFAULT_BITS]


def test_rejection_rules():
    assert not is_valid_pair(FP, 8)
    assert not is_valid_pair(1, 4)
    assert not is_valid_pair(4, 1)
    assert is_valid_pair(1, FP) and is_valid_pair(1, 1) and is_valid_pair(4, FP) and is_valid_pair(FP, FP)


def test_parse_and_check():
    assert parse_config("4") == (4, 4)
    assert parse_config("4/8") == (4, 8)
    assert parse_config("w2a32") == (2, FP)
    assert parse_config("fp") == (FP, FP)
    space = BitSpace((2, 4, 8, FP))
    assert space.parse("all") == [(2, 2), (4, 4), (8, 8), (FP, FP)]
    assert space.parse("2,4/8") == [(2, 2), (4, 8)]
    with pytest.raises(TfbitmetaError, match="not in the model's candidate set"):
        space.parse("3")
    with pytest.raises(TfbitmetaError, match="bad bitwidth"):
        parse_config("17")


def test_slot_table_matches_configs():
    space = BitSpace()
    table = space.slot_table()
    for i, (w, a) in enumerate(space.configs):
        assert table[w, a] == i
    assert (table >= 0).sum() == 75


def test_parse_bits_is_the_one_list_parser():
    from tfbitmeta.errors import BadArgument
    from tfbitmeta.quant.bitwidth import parse_bit, parse_bits

    assert parse_bits("all") == DEFAULT_BITS
    assert parse_bits("all", all_bits=(2, 4)) == (2, 4)
    assert parse_bits("8, 2,fp,2") == (2, 8, FP)
    assert parse_bits("8,2,fp,2", keep_order=True) == (8, 2, FP)
    assert parse_bits("1,16", allowed=(1, 16)) == (1, 16)
    assert parse_bit("FP32") == parse_bit("none") == parse_bit("32") == FP
    assert parse_bit("1") == 1 and parse_bit(" 16 ") == 16
    for bad, match in [("0", "bad bitwidth"), ("17", "bad bitwidth"), ("x", "bad bitwidth"), (",", "no bitwidth"),
                       ("", "no bitwidth")]:
        with pytest.raises(BadArgument, match=match) as e:
            parse_bits(bad)
        assert e.value.param == "bits"
    with pytest.raises(BadArgument, match="bitwidth 16 not allowed here: use 1, 2, fp") as e:
        parse_bits("2,16", allowed=(1, 2, FP), param="client_bits")
    assert e.value.param == "client_bits"


def test_errors_are_value_errors_with_narrow_kinds():
    from tfbitmeta.errors import BadArgument, DataMissing

    assert issubclass(TfbitmetaError, ValueError)
    assert issubclass(BadArgument, TfbitmetaError) and issubclass(DataMissing, TfbitmetaError)
    assert not issubclass(BadArgument, DataMissing)
    assert TfbitmetaError("x").param is None and BadArgument("x", param="bits").param == "bits"


def test_invalid_pairs_follow_the_reference_rules():
    assert is_valid_pair(1, 1) and is_valid_pair(1, FP) and is_valid_pair(FP, FP) and is_valid_pair(2, FP)
    assert not is_valid_pair(FP, 8) and not is_valid_pair(1, 2) and not is_valid_pair(4, 1)
    space = BitSpace((1, 2, FP), w_eq_a=False)
    assert space.configs == [(1, 1), (1, FP), (2, 2), (2, FP), (FP, FP)]
    assert BitSpace((4, 2, 4), w_eq_a=True).configs == [(2, 2), (4, 4)]
    assert space.slot((2, FP)) == 3
    with pytest.raises(TfbitmetaError, match="empty"):
        BitSpace(())
    with pytest.raises(TfbitmetaError, match="bad candidate"):
        BitSpace((2, 20))
    assert BitSpace.from_config(space.to_config()) == space


def test_names_constants_and_parse_edge_cases():
    from tfbitmeta.errors import BadArgument
    from tfbitmeta.quant.bitwidth import MAX_BITS, config_name

    assert FP == MAX_BITS == 32 and DEFAULT_BITS == (1, 2, 3, 4, 5, 6, 7, 8, 16, 32)
    assert [config_name(c) for c in [(4, 4), (4, 8), (FP, FP), (2, FP), (16, 8)]] == ["4", "w4a8", "fp", "w2afp",
                                                                                     "w16a8"]
    assert parse_config("w16a8") == (16, 8) and parse_config("float") == (FP, FP) and parse_config("8/fp") == (8, FP)
    for bad in ("4/8/2", "w4", "wxa2", "w4a8a"):
        with pytest.raises(BadArgument):
            parse_config(bad)
    assert is_valid_pair(FP, 8) is False and is_valid_pair(1, 2) is False and is_valid_pair(4, 1) is False
    with pytest.raises(BadArgument, match="bad candidate"):
        BitSpace((2, 17))
    assert BitSpace((16, FP)).bits == (16, FP)


def test_slot_table_parse_pairs_and_bits_tensor():
    from tfbitmeta.quant.bitwidth import bits_tensor

    space = BitSpace((2, 4, FP))
    table = space.slot_table()
    assert table.shape == (FP + 1, FP + 1) and table.dtype == np.int32
    assert table[3, 3] == -1 and table[FP, 2] == -1 and (table >= 0).sum() == len(space.configs)
    assert space.parse("pairs") == space.configs and space.parse(["2", "4/fp"]) == [(2, 2), (4, FP)]
    t = bits_tensor((4, 8), 3).numpy()
    np.testing.assert_array_equal(t, [[4, 8]] * 3)
    assert t.dtype == np.float32
