"""Static resources of the shipped kernel configurations, compiled for H100 (sm_90) on the CPU.

The forward scan's speed on H100 comes from a spill-free 4-warp loop (benchmarks/results/h100/kernel_choices.md):
a change to the kernel or its configuration that makes it spill, or that needs more shared memory than a block may
have (a launch-time failure on the GPU), fails here, in CI, without a GPU. Runs lightning_attention.testing.kernel_resources in a subprocess: the tests' TRITON_INTERPRET=1 replaces
the kernels by the interpreter's, which cannot be compiled.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from lightning_attention.testing.kernel_resources import SHARED_MEMORY_LIMIT  # noqa: E402

#: Configurations that spill for sm_90 and ship anyway (no spill-free one measured faster on H100:
#: kernel_choices.md), with the most spill bytes allowed (1.5-3x the compiled figure, so that a change making them
#: spill much more fails): pointer loads of two K halves (K = 256) and of fp32 tiles at 8 warps; fp32 tiles
#: under 3xTF32 (torch's default "highest"); the TMA scans of K = 256 at 4 warps (one warpgroup with 80-170
#: spilled bytes took 15-25% less time than two with 0-32: scan_config). fp32 under one-pass TF32 runs
#: spill-free (two warpgroups for heads of 128). All are checked against the shared-memory limit.
KNOWN_SPILLS = {
    ("scan", 256, 256, "bfloat16"): 128,
    ("scan", 128, 128, "float32"): 2200,
    ("scan_tma", 256, 256, "bfloat16"): 256,
    ("scan_paired_tma_reverse", 256, 256, "bfloat16"): 256,
    ("scan_tma", 128, 128, "float32"): 3072,
    ("dkdv", 64, 64, "float32"): 2900,
    # per-token gates: the scans whose configurations above spill, spilling more; the TMA scans with dg's row dots
    # at one warpgroup (16 and 80 bytes at K = 128; scan_config and chunk_scan.GATED_POINTER_WARPS say why); the
    # fused dk/dv kernel, which gated heads of 64 do not take (options.TritonOptions.fused_dkdv_with_gates)
    ("scan_paired_reverse_gdots", 128, 128, "bfloat16"): 24,
    ("scan_tma_gsums", 128, 128, "bfloat16"): 160,
    ("scan_paired_tma_reverse_gdots", 128, 128, "bfloat16"): 48,
    ("scan_tma_g", 256, 256, "bfloat16"): 512,
    ("scan_tma_gsums", 256, 256, "bfloat16"): 768,
    ("scan_paired_tma_reverse_gdots", 256, 256, "bfloat16"): 640,
    ("scan_tma_g", 128, 128, "float32"): 3584,
    ("scan_tma_tf32_gsums", 128, 128, "float32"): 640,
    ("scan_paired_tma_reverse_tf32_gdots", 128, 128, "float32"): 512,
    ("dkdv_g", 64, 64, "bfloat16"): 320,
    ("local_state_g", 128, 128, "float32"): 128,
}


def _resources(arch: int, *options: str) -> list[dict]:
    """kernel_resources' rows compiled for sm_``arch`` (``options``: its --stages / --no-tma)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "lightning_attention.testing.kernel_resources", "--arch", str(arch), "--json"]
    proc = subprocess.run(cmd + list(options), capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr.lower() and "not found" in proc.stderr.lower():
        pytest.skip("Triton's ptxas is not available here")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def sm90_resources():
    return _resources(90)


def test_shipped_configs_fit_hopper_shared_memory(sm90_resources):
    for r in sm90_resources:
        assert r["shared_bytes"] <= SHARED_MEMORY_LIMIT[90], r


def test_scans_and_fused_dkdv_do_not_spill_unless_known(sm90_resources):
    for r in sm90_resources:
        assert r["spill_bytes"] <= KNOWN_SPILLS.get((r["kernel"], r["dk"], r["dv"], r["dtype"]), 0), r
        assert r["registers"] <= 255, r
    assert sum(1 for r in sm90_resources if r["spill_bytes"] == 0) >= 6


def test_main_shape_scan_runs_four_warps(sm90_resources):
    """The configuration behind the measured 0.42 ms (4 warps, 64-wide V-blocks) is the one shipped for 128 x 128."""
    (main,) = [
        r for r in sm90_resources
        if r["kernel"] == "scan" and (r["dk"], r["dv"], r["dtype"]) == (128, 128, "bfloat16")
    ]  # fmt: skip
    assert "num_warps=4" in main["config"] and "block_v=64" in main["config"], main


def test_gated_scans_keep_the_g_gamma_scans_fast_paths(sm90_resources):
    """Per-token gates: the forward (through TMA and pointers) and the pointer dq scan are spill-free, like their
    g_gamma counterparts at K = 128 and 64 (the others: KNOWN_SPILLS); and each gated pointer kernel needs the shared
    memory of its g_gamma counterpart (plus the gates' rows), so that the other GPUs' fallbacks checked below
    without the gated variants fit them too."""
    rows = {(r["kernel"], r["dk"], r["dv"], r["dtype"]): r for r in sm90_resources}
    for name in ("scan_tma_g", "scan_g", "scan_gsums"):
        for dim in (64, 128):
            if (name, dim, dim, "bfloat16") in rows:
                assert rows[(name, dim, dim, "bfloat16")]["spill_bytes"] == 0, (name, dim)
    counterparts = {"scan_g": "scan", "scan_gsums": "scan", "dkdv_g": "dkdv", "local_state_g": "local_state"}
    checked = 0
    for (kernel, dk, dv, dtype), r in rows.items():
        base = rows.get((counterparts.get(kernel), dk, dv, dtype))
        if base is not None:
            assert r["shared_bytes"] <= base["shared_bytes"] + 2048, (r, base)
            checked += 1
    assert checked >= 5


@pytest.mark.parametrize("arch", [89, 100, 120])
def test_pointer_launches_fit_other_gpus(arch):
    """Where a GPU has less shared memory per block than the H100 the configurations were tuned on, a launch
    that does not fit falls back to pointer loads with fewer stages (_common.fitting): every pointer
    kernel must fit Ada (sm_89, 99 KiB; Ampere's consumer cards alike), B200 (sm_100) and consumer Blackwell
    (sm_120, 99 KiB) at its tuned depth or at one stage, the last fallback. (The TMA scans need 120-160 KiB on
    sm_120, and the fp32 one 289 KiB on sm_100: they fall back to the pointer scans.)"""
    pointer_kernels = ("--no-tma", "--no-gates")  # (gated variants: test_gated_scans_keep_the_g_gamma_scans_fast_paths)
    tuned, one_stage = _resources(arch, *pointer_kernels), _resources(arch, *pointer_kernels, "--stages", "1")
    limit = SHARED_MEMORY_LIMIT[arch]
    assert len(tuned) == len(one_stage) >= 8
    for r, r1 in zip(tuned, one_stage):
        assert (r["kernel"], r["dk"], r["dv"], r["dtype"]) == (r1["kernel"], r1["dk"], r1["dv"], r1["dtype"])
        assert r["shared_bytes"] <= limit or r1["shared_bytes"] <= limit, (r, r1)
