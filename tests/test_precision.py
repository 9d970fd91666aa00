"""The one precision map (pipeline/precision.py): spellings, dtypes, DeepSpeed sections, the message."""

from __future__ import annotations

import pytest
import torch

from pipeline import precision
from pipeline.errors import UserError


@pytest.mark.parametrize("spelling, name", [
    ("bf16", "bf16"), ("BFloat16", "bf16"), ("torch.bfloat16", "bf16"), (torch.bfloat16, "bf16"), ("bf16-mixed", "bf16"),
    ("fp16", "fp16"), ("float16", "fp16"), ("half", "fp16"), (16, "fp16"), (torch.float16, "fp16"),
    ("fp32", "fp32"), ("float32", "fp32"), ("float", "fp32"), ("32", "fp32"), (torch.float32, "fp32"),
    ("tf32", "tf32"), ("fp8", None), ("auto", None), (torch.int8, None),
])
def test_every_spelling_has_one_name(spelling, name):
    assert precision.canonical(spelling) == name


def test_torch_dtype_of_each_name():
    assert [precision.torch_dtype(n) for n in (*precision.NAMES, "tf32", "bfloat16")] == [
        torch.bfloat16, torch.float16, torch.float32, torch.float32, torch.bfloat16]
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        precision.torch_dtype("fp8")


def test_parse_accepts_choices_and_spellings_and_names_the_key():
    assert precision.parse("auto", "--dtype", ("auto", *precision.NAMES)) == "auto"
    assert precision.parse("float16", "--dtype") == "fp16" and precision.parse(torch.bfloat16, "dtype") == "bf16"
    with pytest.raises(UserError, match=r"^--dtype='fp8' is not valid; use one of: auto, bf16, fp16, fp32 "
                                        r"\(bfloat16, float16 and float32 are understood too\)\.$"):
        precision.parse("fp8", "--dtype", ("auto", *precision.NAMES))
    with pytest.raises(UserError, match="dtype='tf32' is not valid"):  # a compute mode, not a precision to store
        precision.parse("tf32", "dtype")
    with pytest.raises(UserError, match="'auto' is not valid"):  # auto only where the caller allows it
        precision.parse("auto", "dtype")


@pytest.mark.parametrize("name", precision.NAMES)
def test_ds_sections_round_trip(name):
    assert precision.of_ds_config(precision.ds_flags(name)) == name
    assert precision.ds_flags(name)["bf16"]["enabled"] is (name == "bf16")


def test_of_ds_config_without_sections_is_fp32():
    assert precision.of_ds_config({}) == "fp32"
    assert precision.of_ds_config({"bf16": None, "fp16": {"enabled": False}}) == "fp32"
    with pytest.raises(ValueError):
        precision.ds_flags("auto")
