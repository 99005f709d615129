"""Models by name, the pure part: references, the quantisation a file name carries, which file(s) a reference
picks, split parts, and the default context under a memory budget. Table-driven, no fakes."""

from __future__ import annotations

import pytest

from llama_orchestrator.domain.errors import NotFoundError, UsageError
from llama_orchestrator.domain.model_refs import (
    HfRef,
    catalog_id_ok,
    choose_files,
    default_context,
    group_parts,
    is_hf_ref,
    parse_ref,
    quant_of,
)
from llama_orchestrator.domain.routing import ModelShape, estimate_memory_mb


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hf.co/bartowski/Qwen2.5-0.5B-GGUF:Q4_K_M", HfRef("bartowski/Qwen2.5-0.5B-GGUF", "Q4_K_M")),
        ("bartowski/Qwen2.5-0.5B-GGUF", HfRef("bartowski/Qwen2.5-0.5B-GGUF")),
        ("huggingface.co/a/b:q8_0", HfRef("a/b", "q8_0")),
        ("https://huggingface.co/a/b", HfRef("a/b")),
        ("HF.CO/a/b.c-d_e:IQ2_XXS", HfRef("a/b.c-d_e", "IQ2_XXS")),
    ],
)
def test_parse_ref(text: str, expected: HfRef) -> None:
    assert parse_ref(text) == expected


@pytest.mark.parametrize("text", ["justone", "a/b/c", "hf.co/a", "a/b:Q4 K", "/b", "a/-b", "a/b:Q4/x"])
def test_parse_ref_refuses(text: str) -> None:
    with pytest.raises(UsageError):
        parse_ref(text)


@pytest.mark.parametrize(
    ("text", "is_ref"),
    [("hf.co/a/b", True), ("huggingface.co/a/b", True), ("./models/x.gguf", False), ("qwen-0.5b", False)],
)
def test_is_hf_ref(text: str, is_ref: bool) -> None:
    assert is_hf_ref(text) is is_ref


@pytest.mark.parametrize(
    ("name", "quant"),
    [
        ("qwen2.5-0.5b-instruct-q4_k_m.gguf", "Q4_K_M"),
        ("Meta-Llama-3-8B-Instruct-Q8_0.gguf", "Q8_0"),
        ("model.IQ2_XXS.gguf", "IQ2_XXS"),
        ("gpt-oss-20b-MXFP4.gguf", "MXFP4"),
        ("tiny-F16.gguf", "F16"),
        ("big-Q4_K_M-00002-of-00003.gguf", "Q4_K_M"),
        ("Q4_K_M/big-Q4_K_M-00001-of-00002.gguf", "Q4_K_M"),
        ("plain.gguf", None),
    ],
)
def test_quant_of(name: str, quant: str | None) -> None:
    assert quant_of(name) == quant


def test_group_parts_puts_split_parts_under_the_first() -> None:
    names = ["m-Q8_0-00002-of-00002.gguf", "m-Q8_0-00001-of-00002.gguf", "m-Q4_K_M.gguf", "README.md"]
    assert group_parts(names) == {
        "m-Q4_K_M.gguf": ("m-Q4_K_M.gguf",),
        "m-Q8_0-00001-of-00002.gguf": ("m-Q8_0-00001-of-00002.gguf", "m-Q8_0-00002-of-00002.gguf"),
    }


REPO = [
    "README.md",
    "m-Q4_K_M.gguf",
    "m-Q8_0.gguf",
    "mmproj-m-f16.gguf",
    "m-F16-00001-of-00002.gguf",
    "m-F16-00002-of-00002.gguf",
]


@pytest.mark.parametrize(
    ("files", "ref", "chosen"),
    [
        (REPO, HfRef("u/m", "Q8_0"), ("m-Q8_0.gguf",)),
        (REPO, HfRef("u/m", "q8_0"), ("m-Q8_0.gguf",)),  # case-insensitive, as llama.cpp's -hf
        (REPO, HfRef("u/m"), ("m-Q4_K_M.gguf",)),  # no quant: Q4_K_M
        (REPO, HfRef("u/m", "F16"), ("m-F16-00001-of-00002.gguf", "m-F16-00002-of-00002.gguf")),  # every part
        (
            REPO,
            HfRef("u/m", file="m-F16-00002-of-00002.gguf"),
            ("m-F16-00001-of-00002.gguf", "m-F16-00002-of-00002.gguf"),
        ),
        (REPO, HfRef("u/m", file="m-Q8_0.gguf"), ("m-Q8_0.gguf",)),
        (["only-Q5_K_S.gguf", "mmproj.gguf"], HfRef("u/m"), ("only-Q5_K_S.gguf",)),  # the only model (mmproj aside)
    ],
)
def test_choose_files(files: list[str], ref: HfRef, chosen: tuple[str, ...]) -> None:
    choice = choose_files(files, ref)
    assert choice.files == chosen
    assert choice.primary == chosen[0]


@pytest.mark.parametrize(
    ("files", "ref", "says"),
    [
        (
            REPO,
            HfRef("u/m", "Q2_K"),
            ["no Q2_K file", "m-Q8_0.gguf (:Q8_0)", "m-F16-00001-of-00002.gguf (:F16) [2 parts]"],
        ),
        (["a-Q8_0.gguf", "b-Q5_0.gguf"], HfRef("u/m"), ["several models and no Q4_K_M", "a-Q8_0.gguf", "b-Q5_0.gguf"]),
        (["README.md"], HfRef("u/m"), ["no GGUF file"]),
        (REPO, HfRef("u/m", file="nope.gguf"), ["no file 'nope.gguf'"]),
        (["a-Q4_K_M.gguf", "b-Q4_K_M.gguf"], HfRef("u/m"), ["several Q4_K_M files", "--file"]),
    ],
)
def test_choose_files_explains_what_to_pick(files: list[str], ref: HfRef, says: list[str]) -> None:
    with pytest.raises(NotFoundError) as caught:
        choose_files(files, ref)
    for text in says:
        assert text in str(caught.value)


SHAPE = ModelShape(32, 4096, 32, 8)  # 128 KiB of KV per token
GB = 1024**3


@pytest.mark.parametrize(
    ("trained", "budget", "expected"),
    [
        (32768, None, 32768),  # no budget: the trained context
        (None, None, 4096),  # the model does not say: 4096
        (32768, 1e9, 32768),  # plenty of room
        (128, None, 512),  # never below 512
        (32768, 4 * 1024 + 96 + 1024, 8192),  # 4 GiB of weights + 1 GiB of KV -> 8192 tokens fit
        (32768, 100, 512),  # not even the minimum fits: the minimum (init warns)
    ],
)
def test_default_context(trained: int | None, budget: float | None, expected: int) -> None:
    assert default_context(trained, 4 * GB, SHAPE, budget) == expected


def test_default_context_is_the_largest_that_fits() -> None:
    budget = 4 * 1024 + 96 + 1500.0
    context = default_context(131072, 4 * GB, SHAPE, budget)
    assert estimate_memory_mb(4 * GB, context, SHAPE) <= budget < estimate_memory_mb(4 * GB, context + 256, SHAPE)


@pytest.mark.parametrize(
    ("text", "ok"), [("qwen-0.5b", True), ("a_b.c", True), ("Qwen", False), ("a/b", False), ("-x", False), ("", False)]
)
def test_catalog_ids(text: str, ok: bool) -> None:
    assert catalog_id_ok(text) is ok
