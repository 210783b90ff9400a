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
