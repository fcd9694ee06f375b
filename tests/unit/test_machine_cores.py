"""The cores a process may use (services/common/machine.py), from fake cgroup files and affinities."""

from __future__ import annotations

from pathlib import Path

from services.common.machine import runtime_threads, usable_cores


def test_affinity_alone_sets_the_count(tmp_path: Path) -> None:
    assert usable_cores({0, 1, 2, 3}, tmp_path) == usable_cores({4, 5, 6, 7}, tmp_path)
    cores = usable_cores({2, 3}, tmp_path)
    assert (cores.count, cores.reason) == (2, "2 cores from affinity")


def test_a_cgroup_v2_quota_caps_the_affinity(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    cores = usable_cores({0, 1, 2, 3}, tmp_path)
    assert (cores.count, cores.reason) == (1, "1 core from cgroup quota")
    (tmp_path / "cpu.max").write_text("400000 100000\n")
    assert usable_cores(set(range(8)), tmp_path).count == 4


def test_no_quota_or_a_larger_one_leaves_the_affinity(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cores({0, 1}, tmp_path).reason == "2 cores from affinity"
    (tmp_path / "cpu.max").write_text("800000 100000\n")
    assert usable_cores({0, 1}, tmp_path).reason == "2 cores from affinity"


def test_a_cgroup_v1_quota_caps_the_affinity(tmp_path: Path) -> None:
    folder = tmp_path / "cpu,cpuacct"
    folder.mkdir()
    (folder / "cpu.cfs_quota_us").write_text("200000\n")
    (folder / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cores(set(range(16)), tmp_path).reason == "2 cores from cgroup quota"
    (folder / "cpu.cfs_quota_us").write_text("-1\n")
    assert usable_cores(set(range(16)), tmp_path).count == 16


def test_a_tiny_quota_still_gives_one_core(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("20000 100000\n")
    assert usable_cores({0, 1}, tmp_path).count == 1


def test_a_malformed_cgroup_file_is_no_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("garbage\n")
    assert usable_cores({0, 1, 2}, tmp_path).count == 3


def test_a_configured_count_wins_over_the_cores() -> None:
    threads = runtime_threads(3, "--threads")
    assert (threads.count, threads.reason) == (3, "3 from --threads")
    assert runtime_threads(0, "--threads") == usable_cores()
