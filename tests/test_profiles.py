"""domain/profiles.py: which backend `auto` means for a set of devices, and the defaults of `init --profile`."""

from __future__ import annotations

import pytest

from llama_orchestrator.domain.errors import UsageError
from llama_orchestrator.domain.profiles import GpuDevice, auto_backend, merge_under, profile_defaults, vendor_of

NVIDIA = GpuDevice("nvidia-smi", "cuda", "NVIDIA H200", index=0, total_mib=143771, free_mib=143000)
NVIDIA_VIA_VULKAN = GpuDevice("llama-server", "vulkan", "NVIDIA GeForce RTX 4090", index=0)
AMD_VULKAN = GpuDevice("llama-server", "vulkan", "AMD Radeon RX 7800 XT (RADV NAVI32)", index=0)
AMD_ROCM = GpuDevice("rocm-smi", "rocm", "AMD GPU card0", index=0)
INTEL_VULKAN = GpuDevice("vulkaninfo", "vulkan", "Intel(R) Arc(tm) A770 Graphics (DG2)", index=0, vendor="intel")
APPLE = GpuDevice("llama-server", "metal", "Apple M2 Max", index=0)


@pytest.mark.parametrize(
    ("devices", "platform", "available", "expected"),
    [
        ([], "linux", None, "cpu"),
        ([NVIDIA], "linux", None, "cuda"),
        ([NVIDIA_VIA_VULKAN], "linux", None, "cuda"),
        ([NVIDIA_VIA_VULKAN], "linux", {"vulkan", "cpu"}, "vulkan"),  # only a Vulkan build is registered
        ([NVIDIA], "linux", {"cpu"}, "cpu"),
        ([AMD_VULKAN], "linux", None, "vulkan"),
        ([AMD_VULKAN, AMD_ROCM], "linux", None, "rocm"),
        ([AMD_VULKAN, AMD_ROCM], "linux", {"vulkan"}, "vulkan"),
        ([INTEL_VULKAN], "linux", None, "vulkan"),
        ([], "darwin", None, "metal"),
        ([APPLE], "linux", None, "metal"),
        ([NVIDIA, AMD_VULKAN], "win32", None, "cuda"),
    ],
)
def test_auto_backend(devices, platform, available, expected):
    assert auto_backend(devices, platform=platform, available=available) == expected


@pytest.mark.parametrize(
    ("name", "vendor"),
    [
        ("NVIDIA GeForce RTX 3060", "nvidia"),
        ("AMD Radeon Pro W7900", "amd"),
        ("Radeon RX 580 Series (RADV POLARIS10)", "amd"),
        ("Intel(R) UHD Graphics 770", "intel"),
        ("Apple M3", "apple"),
        ("llvmpipe (LLVM 15)", None),
    ],
)
def test_vendor_from_name(name, vendor):
    assert vendor_of(name) == vendor
    assert GpuDevice("x", "vulkan", name).vendor == vendor


@pytest.mark.parametrize(
    ("profile", "devices", "expected_gpu"),
    [
        ("cpu", [NVIDIA], {"backend": "cpu", "layers": 0}),
        ("cuda", [NVIDIA], {"backend": "cuda", "layers": -1}),
        ("vulkan", [], {"backend": "vulkan", "layers": -1}),
        ("metal", [APPLE], {"backend": "metal", "layers": -1}),
        ("auto", [AMD_VULKAN], {"backend": "vulkan", "layers": -1}),
        ("auto", [], {"backend": "cpu", "layers": 0}),
    ],
)
def test_profile_defaults(profile, devices, expected_gpu):
    assert profile_defaults(profile, physical_cores=8, devices=devices) == {
        "model": {"threads": 8},
        "gpu": expected_gpu,
    }


def test_profile_picks_the_device_with_most_free_memory_when_there_are_several():
    cards = [
        GpuDevice("nvidia-smi", "cuda", "NVIDIA A", index=0, free_mib=1000),
        GpuDevice("nvidia-smi", "cuda", "NVIDIA B", index=1, free_mib=9000),
        GpuDevice("llama-server", "vulkan", "AMD C", index=0, free_mib=99999),  # another backend: not counted
    ]
    assert profile_defaults("cuda", physical_cores=4, devices=cards)["gpu"]["device_id"] == 1
    assert "device_id" not in profile_defaults("vulkan", physical_cores=4, devices=cards)["gpu"]


def test_profile_threads_never_below_one_and_unknown_profile_is_a_usage_error():
    assert profile_defaults("cpu", physical_cores=0, devices=[])["model"]["threads"] == 1
    with pytest.raises(UsageError, match=r"unknown profile 'tpu'.*cpu, vulkan, cuda"):
        profile_defaults("tpu", physical_cores=4, devices=[])


def test_profile_defaults_make_a_valid_config_under_the_users_options():
    from llama_orchestrator.domain.config import InstanceConfig

    explicit = {
        "name": "qwen",
        "model": {"path": "q.gguf", "context_size": 8192, "threads": None},
        "gpu": {"layers": 20, "backend": None},
    }
    document = merge_under(profile_defaults("cuda", physical_cores=6, devices=[NVIDIA]), explicit)
    config = InstanceConfig.from_document(document)
    assert (config.model.threads, config.model.context_size) == (6, 8192)  # None = not given: the profile's
    assert (config.gpu.backend, config.gpu.layers) == ("cuda", 20)  # given: the user's
